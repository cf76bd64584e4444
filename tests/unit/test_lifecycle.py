"""The gateway's request lifecycle (kvmesh.gateway.lifecycle) without a mesh: admission
of embeddings as of generations, slots given back however a request ends, and the
accounting both doors share (auth refusals by reason, answers by status, the log line)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvmesh.core.errors import AuthenticationError, RateLimitedError
from kvmesh.core.logs import request_id_var
from kvmesh.gateway import lifecycle
from kvmesh.gateway.admission import Admission
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.schemas import EmbeddingRequest

pytestmark = pytest.mark.unit
MODEL = "m"


def fake_core(max_requests: int | None = 1, keys: tuple[str, ...] = ()) -> Any:
    """What the lifecycle uses of a GatewayCore: admission, metrics and ``embed``."""
    core = SimpleNamespace(
        admission=Admission(list(keys), max_requests, None, retry_after_s=2),
        metrics=GatewayMetrics(known_models=lambda: [MODEL]),
        embedded=0,
    )

    async def embed(req: EmbeddingRequest, request_id: str) -> str:
        core.embedded += 1
        if req.input == "fail":
            raise RuntimeError("engine failed")
        return f"vectors of {request_id}"

    core.embed = embed
    return core


def request(text: str = "a b c") -> EmbeddingRequest:
    return EmbeddingRequest(model=MODEL, input=text)


def value(core: Any, name: str, **labels: str) -> float:
    return core.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _no_request_id_after() -> Iterator[None]:
    """``arrived`` sets the log context's request id, as it does for a real request
    task; here the tests share one context, so each puts it back."""
    token = request_id_var.set("")
    yield
    request_id_var.reset(token)


def test_embeddings_are_refused_429_while_the_gateway_is_full() -> None:
    core = fake_core(max_requests=1)
    held = core.admission.admit("anonymous", stream=True)  # a generation holds the slot
    with pytest.raises(RateLimitedError) as refused:
        asyncio.run(lifecycle.embed(core, "anonymous", request(), "embd-1"))
    assert refused.value.retry_after_s == 2
    assert core.embedded == 0  # refused before the engine was asked
    held.release()
    assert asyncio.run(lifecycle.embed(core, "anonymous", request(), "embd-2")) == \
        "vectors of embd-2"
    assert core.admission.in_flight == 0  # and its own slot given back


def test_an_embedding_that_fails_gives_its_slot_back() -> None:
    core = fake_core(max_requests=1)
    with pytest.raises(RuntimeError):
        asyncio.run(lifecycle.embed(core, "anonymous", request("fail"), "embd-1"))
    assert core.admission.in_flight == 0


def test_events_closed_before_the_first_is_read_give_the_slot_back() -> None:
    core = fake_core(max_requests=1)

    async def never() -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield

    async def main() -> None:
        events = lifecycle.Releasing(core.admission.admit("k", stream=True), never())
        assert core.admission.in_flight == 1
        await events.aclose()  # e.g. the client left during prefill
        assert core.admission.in_flight == 0

    asyncio.run(main())


def test_refused_credentials_are_counted_by_reason() -> None:
    core = fake_core(keys=("secret",))
    assert lifecycle.authenticate(core, "Bearer secret").startswith("key-")
    for bearer in (None, "Bearer wrong", None):
        with pytest.raises(AuthenticationError):
            lifecycle.authenticate(core, bearer)
    assert value(core, "kvmesh_gateway_auth_failures_total", reason="missing_key") == 2
    assert value(core, "kvmesh_gateway_auth_failures_total", reason="invalid_key") == 1


def test_an_answer_is_counted_and_closes_the_log_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = fake_core()
    record = lifecycle.arrived("req-1")
    with caplog.at_level(logging.INFO, logger="kvmesh.gateway.requests"):
        lifecycle.answered(core, "/v1/embeddings", MODEL, 200, record)
        lifecycle.answered(core, "grpc:Embed", "unknown", "OK", None)  # no record: counted
    assert value(core, "kvmesh_gateway_requests_total", model=MODEL,
                 endpoint="/v1/embeddings", status="200") == 1
    assert value(core, "kvmesh_gateway_requests_total", model="other",
                 endpoint="grpc:Embed", status="OK") == 1
    [line] = [r for r in caplog.records if r.name == "kvmesh.gateway.requests"]
    assert line.request_id == "req-1"  # type: ignore[attr-defined]
    assert line.kvmesh["endpoint"] == "/v1/embeddings"  # type: ignore[attr-defined]
    assert line.kvmesh["status"] == 200  # type: ignore[attr-defined]
