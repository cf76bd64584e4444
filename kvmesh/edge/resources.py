"""The xDS resources of kvmesh's edge, built from the set of gateways (pure).

One listener on the edge address takes HTTP/1.1, HTTP/2 and gRPC (codec AUTO); one route
table sends gRPC (``content-type: application/grpc``) to the gateways' Inference port
and everything else to their HTTP port; two EDS clusters hold those endpoints. Routes
never time out (generations stream for minutes; a stream idle timeout still ends dead
ones), retries happen only before a request reached a gateway (connect failure, refused
stream, reset before request) and go to another gateway, outlier detection ejects a
gateway that keeps failing, and health checks ask each gateway itself (gRPC health on
the Inference port, GET /health on the HTTP port). The access log carries ``x-request-id``.

With the endpoint picker (``picker=True``), generations (POST /v1/chat/completions and
/v1/completions) pass through Envoy's ext_proc filter first: the gateways' gRPC port
serves the Gateway API Inference Extension endpoint-picker protocol
(kvmesh/gateway/picker.py), which names the gateway fronting the worker the router
chose in ``x-gateway-destination-endpoint``; those routes go to an original-destination
cluster that sends each request to exactly that address. Other requests are not picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: The order Envoy wants them in over one ADS stream (clusters before their endpoints,
#: listeners before their routes), so no update points at a missing resource.
ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

HTTP_CLUSTER = "kvmesh_gateways_http"
GRPC_CLUSTER = "kvmesh_gateways_grpc"
#: Original destination: the gateway the endpoint picker named, per request.
PICKED_CLUSTER = "kvmesh_picked"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
EXT_PROC = "envoy.filters.http.ext_proc"
#: The generations the picker places (exact paths, query string aside).
PICKED_PATHS = ("/v1/chat/completions", "/v1/completions")
ROUTE_NAME = "kvmesh"
ACCESS_LOG = ("[%START_TIME%] \"%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%\" %RESPONSE_CODE% "
              "%RESPONSE_FLAGS% %DURATION%ms x-request-id=%REQ(X-REQUEST-ID)% "
              "upstream=%UPSTREAM_HOST% picked=%REQ(X-KVMESH-WORKER)%\n")


@dataclass(frozen=True)
class Gateway:
    """One gateway replica: its HTTP and Inference gRPC addresses (host:port)."""

    http: str
    grpc: str


def _seconds(s: float) -> duration_pb2.Duration:
    whole = int(s)
    return duration_pb2.Duration(seconds=whole, nanos=int((s - whole) * 1e9))


def _packed(msg: message.Message) -> any_pb2.Any:
    holder = any_pb2.Any()
    holder.Pack(msg)
    return holder


def _address(hostport: str) -> address_pb2.Address:
    host, _, port = hostport.rpartition(":")
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=host, port_value=int(port)))


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3)


def _ext_proc() -> hcm_pb2.HttpFilter:
    """The endpoint picker's filter: the request's headers, then its whole body, to the
    gateways' gRPC port; a picker that fails fails the request (it must not reach a
    destination the client named)."""
    mode = processing_mode_pb2.ProcessingMode
    return hcm_pb2.HttpFilter(name=EXT_PROC, typed_config=_packed(ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=GRPC_CLUSTER),
            timeout=_seconds(10)),
        failure_mode_allow=False,
        message_timeout=_seconds(10),
        processing_mode=mode(
            request_header_mode=mode.SEND, response_header_mode=mode.SKIP,
            request_body_mode=mode.BUFFERED, response_body_mode=mode.NONE,
            request_trailer_mode=mode.SKIP, response_trailer_mode=mode.SKIP))))


def listener(address: str, picker: bool = False) -> listener_pb2.Listener:
    filters = [_ext_proc()] if picker else []
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                      typed_config=_packed(router_pb2.Router())))
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="kvmesh_edge",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_NAME),
        http_filters=filters,
        access_log=[accesslog_pb2.AccessLog(
            name="envoy.access_loggers.stdout",
            typed_config=_packed(stream_pb2.StdoutAccessLog(
                log_format=substitution_format_string_pb2.SubstitutionFormatString(
                    text_format_source=base_pb2.DataSource(inline_string=ACCESS_LOG)))))],
        # Streams may last minutes; one silent for 5 minutes is dead.
        stream_idle_timeout=_seconds(300),
        request_timeout=_seconds(0),
        # Keep a client's x-request-id (the gateway echoes and logs it); make one if absent.
        preserve_external_request_id=True,
    )
    return listener_pb2.Listener(
        name="kvmesh_edge", address=_address(address),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager",
                typed_config=_packed(manager))])])


def routes(picker: bool = False) -> route_pb2.RouteConfiguration:
    # Only failures before a gateway saw the request are retried (a generation is not
    # idempotent), each on another gateway than the ones that failed it.
    retry = route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset-before-request",
        num_retries=wrappers_pb2.UInt32Value(value=2),
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=_packed(previous_hosts_pb2.PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=3)

    def to(cluster: str) -> route_components_pb2.RouteAction:
        return route_components_pb2.RouteAction(cluster=cluster, timeout=_seconds(0),
                                                retry_policy=retry)

    unpicked = {EXT_PROC: _packed(ext_proc_pb2.ExtProcPerRoute(disabled=True))} if picker else {}
    picked = [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(path=path),
            # The picker named the gateway: it is the only host (no retry elsewhere).
            route=route_components_pb2.RouteAction(cluster=PICKED_CLUSTER, timeout=_seconds(0)))
        for path in PICKED_PATHS
    ] if picker else []
    return route_pb2.RouteConfiguration(name=ROUTE_NAME, virtual_hosts=[
        route_components_pb2.VirtualHost(name="kvmesh", domains=["*"], routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(
                    prefix="/", grpc=route_components_pb2.RouteMatch.GrpcRouteMatchOptions()),
                route=to(GRPC_CLUSTER), typed_per_filter_config=unpicked),
            *picked,
            route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                       route=to(HTTP_CLUSTER), typed_per_filter_config=unpicked),
        ])])


def picked_cluster() -> cluster_pb2.Cluster:
    """Each request to the address in its ``x-gateway-destination-endpoint`` header."""
    return cluster_pb2.Cluster(
        name=PICKED_CLUSTER, type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED, connect_timeout=_seconds(1),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(
            use_http_header=True, http_header_name=DESTINATION_HEADER))


def clusters() -> list[cluster_pb2.Cluster]:
    def cluster(name: str, check: health_check_pb2.HealthCheck, http2: bool) -> cluster_pb2.Cluster:
        c = cluster_pb2.Cluster(
            name=name, type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
            connect_timeout=_seconds(1), lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
            health_checks=[check],
            # A gateway taken out of the set leaves at once (its open streams finish),
            # not when it first fails a health check.
            ignore_health_on_host_removal=True,
            # A new gateway takes traffic as soon as its first health check passes:
            # Envoy otherwise merges health changes over a 1 s window.
            common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
                update_merge_window=_seconds(0)),
            outlier_detection=outlier_detection_pb2.OutlierDetection(
                consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
                consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=3),
                base_ejection_time=_seconds(10)),
        )
        if http2:
            c.typed_extension_protocol_options[
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(
                http_protocol_options_pb2.HttpProtocolOptions(
                    explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions
                    .ExplicitHttpConfig(http2_protocol_options=protocol_pb2.Http2ProtocolOptions())))
        return c

    def health(**kind: object) -> health_check_pb2.HealthCheck:
        # A gateway not yet healthy (or without traffic, which is the same for a new
        # one: it gets none until it passes) is asked again within 0.5 s, not after
        # Envoy's 60 s no-traffic default.
        return health_check_pb2.HealthCheck(
            timeout=_seconds(2), interval=_seconds(2), unhealthy_interval=_seconds(0.5),
            no_traffic_interval=_seconds(0.5),
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=2),
            healthy_threshold=wrappers_pb2.UInt32Value(value=1), **kind)

    return [
        cluster(HTTP_CLUSTER, health(http_health_check=health_check_pb2.HealthCheck
                                     .HttpHealthCheck(path="/health")), http2=False),
        cluster(GRPC_CLUSTER, health(grpc_health_check=health_check_pb2.HealthCheck
                                     .GrpcHealthCheck()), http2=True),
    ]


def endpoints(gateways: Sequence[Gateway]) -> list[endpoint_pb2.ClusterLoadAssignment]:
    def assignment(name: str, addresses: list[str]) -> endpoint_pb2.ClusterLoadAssignment:
        return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=_address(a))) for a in addresses])])

    return [assignment(HTTP_CLUSTER, [g.http for g in gateways]),
            assignment(GRPC_CLUSTER, [g.grpc for g in gateways])]


def resources(edge_address: str, gateways: Sequence[Gateway],
              picker: bool = False) -> dict[str, list[message.Message]]:
    """Every resource of the edge, by type URL; ``picker``: generations placed by the
    endpoint picker."""
    return {CLUSTER: [*clusters(), *([picked_cluster()] if picker else [])],
            ENDPOINT: list(endpoints(gateways)),
            LISTENER: [listener(edge_address, picker)], ROUTE: [routes(picker)]}
