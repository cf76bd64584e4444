from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker", "heartbeat_interval_s", "lease_ttl_s")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    heartbeat_interval_s: float
    lease_ttl_s: float
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_ttl_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "adapters", "servable_adapters")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SERVABLE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    servable_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., servable_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("known", "in_flight")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    known: bool
    in_flight: int
    def __init__(self, known: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "adapter", "token_ids", "max_tokens", "exclude_worker_ids", "packed_token_ids", "preview", "prefer_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    PREFER_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    adapter: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    exclude_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    packed_token_ids: bytes
    preview: bool
    prefer_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., exclude_worker_ids: _Optional[_Iterable[str]] = ..., packed_token_ids: _Optional[bytes] = ..., preview: _Optional[bool] = ..., prefer_worker_id: _Optional[str] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("mode", "worker", "prefill_worker", "expected_cached_tokens", "reason", "policy")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[RouteDecision.Mode]
        MODE_AGGREGATED: _ClassVar[RouteDecision.Mode]
        MODE_DISAGGREGATED: _ClassVar[RouteDecision.Mode]
    MODE_UNSPECIFIED: RouteDecision.Mode
    MODE_AGGREGATED: RouteDecision.Mode
    MODE_DISAGGREGATED: RouteDecision.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    mode: RouteDecision.Mode
    worker: _common_pb2.WorkerInfo
    prefill_worker: _common_pb2.WorkerInfo
    expected_cached_tokens: int
    reason: str
    policy: str
    def __init__(self, mode: _Optional[_Union[RouteDecision.Mode, str]] = ..., worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., prefill_worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., expected_cached_tokens: _Optional[int] = ..., reason: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class RequestFinishedRequest(_message.Message):
    __slots__ = ("request_id", "worker_id", "worker_failed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FAILED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    worker_id: str
    worker_failed: bool
    def __init__(self, request_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_failed: _Optional[bool] = ...) -> None: ...

class RequestFinishedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteBatchRequest(_message.Message):
    __slots__ = ("requests", "finished", "defer_waits", "batch_id", "timeout_s")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DEFER_WAITS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RouteRequest]
    finished: _containers.RepeatedCompositeFieldContainer[RequestFinishedRequest]
    defer_waits: bool
    batch_id: int
    timeout_s: float
    def __init__(self, requests: _Optional[_Iterable[_Union[RouteRequest, _Mapping]]] = ..., finished: _Optional[_Iterable[_Union[RequestFinishedRequest, _Mapping]]] = ..., defer_waits: _Optional[bool] = ..., batch_id: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RouteBatchResult(_message.Message):
    __slots__ = ("decision", "code", "message", "status_details", "param", "deferred")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    decision: RouteDecision
    code: int
    message: str
    status_details: bytes
    param: str
    deferred: bool
    def __init__(self, decision: _Optional[_Union[RouteDecision, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., status_details: _Optional[bytes] = ..., param: _Optional[str] = ..., deferred: _Optional[bool] = ...) -> None: ...

class RouteBatchResponse(_message.Message):
    __slots__ = ("results", "batch_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RouteBatchResult]
    batch_id: int
    def __init__(self, results: _Optional[_Iterable[_Union[RouteBatchResult, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "load", "last_seen_age_s", "indexed_blocks", "unreachable")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    load: _common_pb2.WorkerLoad
    last_seen_age_s: float
    indexed_blocks: int
    unreachable: bool
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., last_seen_age_s: _Optional[float] = ..., indexed_blocks: _Optional[int] = ..., unreachable: _Optional[bool] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("model", "role", "workers", "desired", "need")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    NEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: str
    workers: int
    desired: int
    need: float
    def __init__(self, model: _Optional[str] = ..., role: _Optional[str] = ..., workers: _Optional[int] = ..., desired: _Optional[int] = ..., need: _Optional[float] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "policy", "pools")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    policy: str
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., policy: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ...) -> None: ...

class WatchWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerSet(_message.Message):
    __slots__ = ("workers", "version", "router_metrics_endpoint", "gateways", "unreachable_worker_ids")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTER_METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    version: int
    router_metrics_endpoint: str
    gateways: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    unreachable_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ..., version: _Optional[int] = ..., router_metrics_endpoint: _Optional[str] = ..., gateways: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ..., unreachable_worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...
