import asyncio

import pytest

from kvmesh.router.admission import Admission, AdmissionTimeout

pytestmark = pytest.mark.unit


class Pool:
    """Workers as names with in-flight counts, like the registry's view."""

    def __init__(self, **in_flight: int) -> None:
        self.in_flight = dict(in_flight)

    def candidates(self) -> list[str]:
        return list(self.in_flight)

    def count(self, worker: str) -> int:
        return self.in_flight[worker]


async def waiting(gate: Admission, pool: Pool) -> asyncio.Task[list[str]]:
    """A request that has started waiting at ``gate`` for a slot in ``pool``."""
    task = asyncio.create_task(gate.admit(pool.candidates, pool.count, 5.0))
    await asyncio.sleep(0.01)
    return task


def test_no_limit_admits_everything() -> None:
    pool = Pool(a=100, b=7)
    assert asyncio.run(Admission(0).admit(pool.candidates, pool.count, 1.0)) == ["a", "b"]


def test_only_workers_with_a_free_slot_are_offered() -> None:
    pool = Pool(a=2, b=1)
    assert asyncio.run(Admission(2).admit(pool.candidates, pool.count, 1.0)) == ["b"]


def test_a_full_pool_waits_for_a_slot_and_times_out_without_one() -> None:
    async def main() -> None:
        pool = Pool(a=1)
        gate = Admission(1)
        waiter = asyncio.create_task(gate.admit(pool.candidates, pool.count, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done() and gate.waiting == 1
        pool.in_flight["a"] = 0
        gate.notify()
        assert await waiter == ["a"]
        assert gate.waiting == 0
        pool.in_flight["a"] = 1
        with pytest.raises(AdmissionTimeout):
            await gate.admit(pool.candidates, pool.count, 0.05)
        assert gate.waiting == 0

    asyncio.run(main())


def test_waiters_are_admitted_in_arrival_order() -> None:
    async def main() -> None:
        pool = Pool(a=1)
        gate = Admission(1)
        order: list[int] = []

        async def request(i: int) -> None:
            await gate.admit(pool.candidates, pool.count, 5.0)
            pool.in_flight["a"] += 1  # the caller takes the slot synchronously
            order.append(i)

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(request(i)))
            await asyncio.sleep(0.01)
        for _ in range(4):  # one slot frees at a time
            pool.in_flight["a"] -= 1
            gate.notify()
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]

    asyncio.run(main())


async def test_a_newcomer_queues_behind_earlier_waiters() -> None:
    pool, gate = Pool(a=1), Admission(1)
    first = await waiting(gate, pool)
    pool.in_flight["a"] = 0  # a slot frees, nobody has been told yet
    late = await waiting(gate, pool)
    assert not late.done()  # the earlier waiter has the first claim
    gate.notify()
    assert await first == ["a"]
    assert await late == ["a"]  # woken when the first left (slot still free here)


async def test_a_vanished_pool_returns_empty_instead_of_waiting() -> None:
    pool, gate = Pool(a=1), Admission(1)
    waiter = await waiting(gate, pool)
    pool.in_flight.clear()  # the worker died
    gate.notify()
    assert await waiter == []
