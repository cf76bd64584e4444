"""The edge's xDS resources, built from a gateway set (pure): what Envoy is told."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from kvmesh.edge.resources import (
    CLUSTER,
    ENDPOINT,
    GRPC_CLUSTER,
    HTTP_CLUSTER,
    LISTENER,
    ORDER,
    ROUTE,
    ROUTE_NAME,
    Gateway,
    resources,
)

pytestmark = pytest.mark.unit
EDGE = "127.0.0.1:8080"
A = Gateway(http="127.0.0.1:9001", grpc="127.0.0.1:9101")
B = Gateway(http="127.0.0.1:9002", grpc="127.0.0.1:9102")


def hosts(assignment) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"{e.endpoint.address.socket_address.address}:"
            f"{e.endpoint.address.socket_address.port_value}"
            for group in assignment.endpoints for e in group.lb_endpoints]


def manager() -> hcm_pb2.HttpConnectionManager:
    (listener,) = resources(EDGE, [A])[LISTENER]
    out = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(out)
    return out


def test_every_type_is_there_and_envoy_order_puts_dependencies_first() -> None:
    built = resources(EDGE, [A, B])
    assert set(built) == set(ORDER) == {LISTENER, ROUTE, CLUSTER, ENDPOINT}
    assert ORDER.index(CLUSTER) < ORDER.index(ENDPOINT)
    assert ORDER.index(LISTENER) < ORDER.index(ROUTE)


def test_endpoints_are_the_gateway_set_and_nothing_else() -> None:
    built = resources(EDGE, [A, B])
    by_cluster = {a.cluster_name: hosts(a) for a in built[ENDPOINT]}
    assert by_cluster == {HTTP_CLUSTER: [A.http, B.http], GRPC_CLUSTER: [A.grpc, B.grpc]}
    empty = {a.cluster_name: hosts(a) for a in resources(EDGE, [])[ENDPOINT]}
    assert empty == {HTTP_CLUSTER: [], GRPC_CLUSTER: []}  # no gateway: clusters stay, empty


def test_a_snapshot_is_consistent_every_reference_resolves() -> None:
    built = resources(EDGE, [A])
    clusters = {c.name for c in built[CLUSTER]}
    assert {a.cluster_name for a in built[ENDPOINT]} == clusters  # every EDS cluster fed
    (routes,) = built[ROUTE]
    assert routes.name == manager().rds.route_config_name == ROUTE_NAME
    assert {r.route.cluster for vh in routes.virtual_hosts for r in vh.routes} <= clusters
    (listener,) = built[LISTENER]
    assert (listener.address.socket_address.address,
            listener.address.socket_address.port_value) == ("127.0.0.1", 8080)


def test_the_same_set_builds_the_same_bytes() -> None:
    """Versions differ only when the set does: a snapshot is a function of it."""
    first, again = resources(EDGE, [A, B]), resources(EDGE, [A, B])
    for type_url in ORDER:
        assert [m.SerializeToString(deterministic=True) for m in first[type_url]] == [
            m.SerializeToString(deterministic=True) for m in again[type_url]]


def test_grpc_goes_to_the_inference_port_over_http2_the_rest_to_http() -> None:
    (routes,) = resources(EDGE, [A])[ROUTE]
    grpc_route, http_route = routes.virtual_hosts[0].routes
    assert grpc_route.match.HasField("grpc") and grpc_route.route.cluster == GRPC_CLUSTER
    assert not http_route.match.HasField("grpc") and http_route.route.cluster == HTTP_CLUSTER
    clusters = {c.name: c for c in resources(EDGE, [A])[CLUSTER]}
    options = http_protocol_options_pb2.HttpProtocolOptions()
    clusters[GRPC_CLUSTER].typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert not clusters[HTTP_CLUSTER].typed_extension_protocol_options
    assert manager().codec_type == hcm_pb2.HttpConnectionManager.AUTO  # h1, h2, gRPC


def test_long_streams_no_route_timeout_idle_streams_end() -> None:
    (routes,) = resources(EDGE, [A])[ROUTE]
    for route in routes.virtual_hosts[0].routes:
        assert route.route.timeout.ToSeconds() == 0  # 0 = none: a generation may stream on
    assert manager().stream_idle_timeout.ToSeconds() == 300
    assert manager().request_timeout.ToSeconds() == 0


def test_retries_only_before_a_gateway_saw_the_request_and_elsewhere() -> None:
    (routes,) = resources(EDGE, [A])[ROUTE]
    for route in routes.virtual_hosts[0].routes:
        policy: route_components_pb2.RetryPolicy = route.route.retry_policy
        assert set(policy.retry_on.split(",")) == {
            "connect-failure", "refused-stream", "reset-before-request"}
        assert [p.name for p in policy.retry_host_predicate] == [
            "envoy.retry_host_predicates.previous_hosts"]


def test_health_checks_outlier_detection_and_the_access_log() -> None:
    clusters = {c.name: c for c in resources(EDGE, [A])[CLUSTER]}
    assert clusters[HTTP_CLUSTER].health_checks[0].http_health_check.path == "/health"
    assert clusters[GRPC_CLUSTER].health_checks[0].HasField("grpc_health_check")
    for cluster in clusters.values():
        assert cluster.outlier_detection.consecutive_gateway_failure.value > 0
        assert cluster.ignore_health_on_host_removal  # a removed gateway leaves at once
    assert manager().preserve_external_request_id
    assert "%REQ(X-REQUEST-ID)%" in str(manager().access_log[0].typed_config.value)


def test_picker_mode_generations_go_through_ext_proc_to_the_named_gateway() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

    from kvmesh.edge.resources import EXT_PROC, PICKED_CLUSTER, PICKED_PATHS

    built = resources(EDGE, [A, B], picker=True)
    (listener,) = built[LISTENER]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == [EXT_PROC, "envoy.filters.http.router"]
    ext = ext_proc_pb2.ExternalProcessor()
    hcm.http_filters[0].typed_config.Unpack(ext)
    # The picker is asked on the gateways' gRPC port; a picker failure fails the request.
    assert ext.grpc_service.envoy_grpc.cluster_name == GRPC_CLUSTER
    assert not ext.failure_mode_allow
    assert ext.processing_mode.request_body_mode == ext.processing_mode.BUFFERED
    assert ext.processing_mode.response_header_mode == ext.processing_mode.SKIP

    picked = {c.name: c for c in built[CLUSTER]}[PICKED_CLUSTER]
    assert picked.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert picked.original_dst_lb_config.use_http_header
    assert picked.original_dst_lb_config.http_header_name == "x-gateway-destination-endpoint"

    (table,) = built[ROUTE]
    routes = table.virtual_hosts[0].routes
    to_picked = [r.match.path for r in routes if r.route.cluster == PICKED_CLUSTER]
    assert to_picked == list(PICKED_PATHS)
    # Every other route turns the filter off (gRPC, models, embeddings, health, ...).
    others = [r for r in routes if r.route.cluster != PICKED_CLUSTER]
    assert others and all(EXT_PROC in r.typed_per_filter_config for r in others)
    # Without the picker nothing of it is there.
    plain = resources(EDGE, [A, B])
    assert PICKED_CLUSTER not in {c.name for c in plain[CLUSTER]}
