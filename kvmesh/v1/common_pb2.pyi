from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_BOTH: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_GATEWAY: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_BOTH: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_GATEWAY: WorkerRole

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "endpoint", "model", "adapters", "role", "block_size", "nixl_side_channel", "dp_rank", "metrics_endpoint", "max_context_length", "kv_capacity_tokens", "self_registered", "kv_connector", "http_endpoint", "draining", "lora_slots", "servable_adapters", "routing_policy", "dp_group", "dp_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NIXL_SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SELF_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    KV_CONNECTOR_FIELD_NUMBER: _ClassVar[int]
    HTTP_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LORA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SERVABLE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    DP_GROUP_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    endpoint: str
    model: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    role: WorkerRole
    block_size: int
    nixl_side_channel: str
    dp_rank: int
    metrics_endpoint: str
    max_context_length: int
    kv_capacity_tokens: int
    self_registered: bool
    kv_connector: str
    http_endpoint: str
    draining: bool
    lora_slots: int
    servable_adapters: _containers.RepeatedScalarFieldContainer[str]
    routing_policy: str
    dp_group: str
    dp_size: int
    def __init__(self, worker_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., model: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., block_size: _Optional[int] = ..., nixl_side_channel: _Optional[str] = ..., dp_rank: _Optional[int] = ..., metrics_endpoint: _Optional[str] = ..., max_context_length: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., self_registered: _Optional[bool] = ..., kv_connector: _Optional[str] = ..., http_endpoint: _Optional[str] = ..., draining: _Optional[bool] = ..., lora_slots: _Optional[int] = ..., servable_adapters: _Optional[_Iterable[str]] = ..., routing_policy: _Optional[str] = ..., dp_group: _Optional[str] = ..., dp_size: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("num_running", "num_waiting", "kv_usage", "in_flight", "age_s", "cache_hit_rate")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    kv_usage: float
    in_flight: int
    age_s: float
    cache_hit_rate: float
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., in_flight: _Optional[int] = ..., age_s: _Optional[float] = ..., cache_hit_rate: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...
