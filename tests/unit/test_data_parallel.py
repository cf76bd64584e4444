"""Data-parallel attention (+ expert parallelism) as a gang: the engine settings each
rank gets, the launcher's expansion into ranks, and the router's treatment of the
ranks as one group (balanced, prefix-affine per rank, whole or not at all)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from kvmesh.core.config import RouterConfig, WorkerConfig
from kvmesh.core.engine_config import EngineConfig
from kvmesh.core.mesh_config import MeshConfig
from kvmesh.launch import placement
from kvmesh.launch.pools import plan_pools, with_ranks
from kvmesh.router.core import RouteQuery, RouterCore
from kvmesh.router.policy.base import RouteContext
from kvmesh.router.registry import WorkerState
from kvmesh.worker.engine_args import engine_kwargs
from kvmesh.worker.worker import dp_registration

pytestmark = pytest.mark.unit


def _dp_worker(**engine: object) -> WorkerConfig:
    return WorkerConfig(worker_id="moe", engine=EngineConfig(
        data_parallel_size=2, enable_expert_parallel=True, **engine))


def _ports() -> itertools.count[int]:
    return itertools.count(41000)


def test_a_dp_worker_becomes_one_config_per_rank_sharing_the_gangs_ports() -> None:
    ports = _ports()
    ranks = placement.dp_ranks(_dp_worker(), lambda: next(ports))
    assert [r.worker_id for r in ranks] == ["moe-dp0", "moe-dp1"]
    assert [r.engine.data_parallel_rank for r in ranks] == [0, 1]
    assert {(r.engine.data_parallel_rpc_port, r.engine.data_parallel_master_port)
            for r in ranks} == {(41000, 41001)}
    assert {r.engine.data_parallel_group for r in ranks} == {"moe"}
    plain = WorkerConfig(worker_id="w")
    assert placement.dp_ranks(plain, lambda: next(ports)) == [plain]


def test_each_rank_gets_vllms_external_lb_settings_for_its_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ports = _ports()
    rank1 = placement.dp_ranks(_dp_worker(), lambda: next(ports))[1]
    kwargs = engine_kwargs(rank1.model_copy(update={"run_dir": tmp_path}), tmp_path, "m",
                           "moe-dp1")
    assert {k: kwargs[k] for k in (
        "data_parallel_size", "data_parallel_rank", "data_parallel_size_local",
        "data_parallel_external_lb", "data_parallel_address", "data_parallel_rpc_port",
        "master_addr", "master_port", "enable_expert_parallel",
        "distributed_executor_backend")} == {
        "data_parallel_size": 2, "data_parallel_rank": 1, "data_parallel_size_local": 1,
        "data_parallel_external_lb": True, "data_parallel_address": "127.0.0.1",
        "data_parallel_rpc_port": 41000, "master_addr": "127.0.0.1", "master_port": 41001,
        "enable_expert_parallel": True, "distributed_executor_backend": "mp"}
    assert dp_registration(rank1) == {"dp_rank": 1, "dp_size": 2, "dp_group": "moe"}
    # Without DP: no DP settings, rank -1 at the router.
    assert "data_parallel_size" not in engine_kwargs(WorkerConfig(run_dir=tmp_path),
                                                     tmp_path, "m", "w")
    assert dp_registration(WorkerConfig()) == {"dp_rank": -1}
    with pytest.raises(ValueError, match="the launcher sets them per rank"):
        engine_kwargs(_dp_worker(data_parallel_rank=0).model_copy(
            update={"run_dir": tmp_path}), tmp_path, "m", "w")


def test_kvmesh_up_starts_every_rank_on_cores_of_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = MeshConfig(workers=1, worker={"engine": {"data_parallel_size": 2}})
    ports = iter(range(41000, 41100))
    configs = with_ranks(config, plan_pools(config, "127.0.0.1:1", tmp_path, ncpus=2),
                         lambda: next(ports), ncpus=2)[0]  # the chat model's pool
    assert len(configs) == 2
    assert [c.engine.data_parallel_rank for c in configs] == [0, 1]
    assert configs[0].cpu_bind != configs[1].cpu_bind
    assert len({c.engine.data_parallel_group for c in configs}) == 1


def _core(*workers: WorkerState) -> RouterCore:
    core = RouterCore(RouterConfig(metrics_port=None, seed=0))
    for w in workers:
        core.add_worker(w)
    return core


def _rank(rank: int, group: str = "g", size: int = 2) -> WorkerState:
    return WorkerState(worker_id=f"{group}-dp{rank}", endpoint=f"e{rank}", model="moe",
                       block_size=32, dp_rank=rank, dp_group=group, dp_size=size)


def test_a_gang_is_routed_to_only_while_every_rank_is_registered() -> None:
    core = _core(_rank(0))
    assert core.registry.candidates("moe") == []
    core.add_worker(_rank(1))
    assert [w.worker_id for w in core.registry.candidates("moe")] == ["g-dp0", "g-dp1"]


def test_one_rank_gone_takes_its_whole_gang_but_no_other() -> None:
    solo = WorkerState(worker_id="solo", endpoint="s", model="moe", block_size=32)
    core = _core(_rank(0), _rank(1), _rank(0, "h"), _rank(1, "h"), solo)
    assert sorted(core.remove_worker("g-dp1")) == ["g-dp0", "g-dp1"]
    assert sorted(w.worker_id for w in core.workers()) == ["h-dp0", "h-dp1", "solo"]
    core.registry.get("h-dp0").last_seen = -1e9  # its lease ran out
    assert sorted(core.expire()) == ["h-dp0", "h-dp1"]
    assert [w.worker_id for w in core.workers()] == ["solo"]


async def test_requests_spread_over_the_ranks_and_a_prefix_stays_on_its_rank() -> None:
    core = _core(_rank(0), _rank(1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40_000, 512, dtype=np.uint32) for _ in range(16)]
    first = []
    for i, prompt in enumerate(prompts):
        choice = await core.route(RouteQuery(RouteContext(f"a{i}", "moe", token_ids=prompt)))
        first.append(choice.worker.worker_id)
    assert set(first) == {"g-dp0", "g-dp1"}  # balanced over the ranks
    again = random.Random(1).sample(range(16), 8)
    for i in again:
        choice = await core.route(RouteQuery(RouteContext(f"b{i}", "moe",
                                                          token_ids=prompts[i])))
        assert choice.worker.worker_id == first[i]  # prefix-affine per rank
        assert choice.expected_cached_tokens == 512


def test_a_ranks_kv_event_sockets_are_linked_where_the_servicer_subscribes(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zmq

    from kvmesh.worker.engine_args import dp_socket_links, kv_events_config

    assert dp_socket_links(kv_events_config(tmp_path, "w"), 0) == []
    events = kv_events_config(tmp_path, "moe-dp1", 1)
    assert "inproc" in events["endpoint"]  # vLLM offsets such a name for rank 1
    links = dp_socket_links(events, 1)
    assert [str(t) for _, t in links] == [
        events["endpoint"].removeprefix("ipc://") + "_dp1",
        events["replay_endpoint"].removeprefix("ipc://") + "_dp1"]
    link, target = links[0]
    link.symlink_to(target)
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        pub.bind(f"ipc://{target}")  # where the rank's engine publishes
        sub.connect(events["endpoint"])  # where the servicer subscribes
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 200)
        for _ in range(25):
            pub.send(b"kv")
            try:
                assert sub.recv() == b"kv"
                break
            except zmq.Again:
                continue
        else:
            raise AssertionError("nothing arrived through the link")
    finally:
        pub.close(0)
        sub.close(0)
