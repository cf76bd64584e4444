from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddModelRequest(_message.Message):
    __slots__ = ("model_config_json",)
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model_config_json: str
    def __init__(self, model_config_json: _Optional[str] = ...) -> None: ...

class AddModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: MeshModel
    def __init__(self, model: _Optional[_Union[MeshModel, _Mapping]] = ...) -> None: ...

class RemoveModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class RemoveModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: MeshModel
    def __init__(self, model: _Optional[_Union[MeshModel, _Mapping]] = ...) -> None: ...

class ListMeshModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMeshModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[MeshModel]
    def __init__(self, models: _Optional[_Iterable[_Union[MeshModel, _Mapping]]] = ...) -> None: ...

class MeshModel(_message.Message):
    __slots__ = ("model_id", "model_config_json", "workers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_config_json: str
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    def __init__(self, model_id: _Optional[str] = ..., model_config_json: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ...) -> None: ...
