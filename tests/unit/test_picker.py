"""The endpoint picker's pure parts: which gateway fronts a worker, and the answer Envoy
gets (Gateway API Inference Extension: header and envoy.lb metadata)."""

from __future__ import annotations

import pytest

from kvmesh.gateway.picker import DESTINATION_HEADER, WORKER_HEADER, body_response, destination
from kvmesh.v1 import common_pb2

pytestmark = pytest.mark.unit


def gw(http: str) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=f"gateway-{http}", http_endpoint=http)


def worker(worker_id: str, endpoint: str) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=worker_id, endpoint=endpoint)


def test_a_gateway_on_the_workers_host_fronts_it() -> None:
    gateways = [gw("10.0.0.1:8000"), gw("10.0.0.2:8000"), gw("10.0.0.3:8000")]
    assert destination(worker("w", "10.0.0.2:7000"), gateways) == "10.0.0.2:8000"


def test_otherwise_one_worker_keeps_one_gateway_and_workers_spread() -> None:
    gateways = [gw(f"127.0.0.1:{9000 + i}") for i in range(4)]
    elsewhere = [worker(f"w{i}", f"10.1.0.{i}:7000") for i in range(64)]
    picks = [destination(w, gateways) for w in elsewhere]
    assert picks == [destination(w, list(reversed(gateways))) for w in elsewhere]
    assert len(set(picks)) == 4
    # Rendezvous hashing: removing a gateway moves only the workers it fronted.
    fewer = gateways[1:]
    moved = [w for w, p in zip(elsewhere, picks, strict=True)
             if p != gateways[0].http_endpoint and destination(w, fewer) != p]
    assert moved == []


def test_no_gateway_registered_gives_no_destination() -> None:
    assert destination(worker("w", "127.0.0.1:1"), [common_pb2.WorkerInfo()]) == ""


def test_the_answer_sets_header_worker_and_lb_metadata() -> None:
    reply = body_response("127.0.0.1:9001", "w1")
    headers = {h.header.key: h.header.raw_value.decode()
               for h in reply.request_body.response.header_mutation.set_headers}
    assert headers == {DESTINATION_HEADER: "127.0.0.1:9001", WORKER_HEADER: "w1"}
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value
    assert lb.fields[DESTINATION_HEADER].string_value == "127.0.0.1:9001"
    assert WORKER_HEADER not in {h.header.key for h in body_response("a:1", "").request_body
                                 .response.header_mutation.set_headers}
