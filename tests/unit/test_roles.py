import pytest

from kvmesh.core.roles import WorkerRole, role_from_proto, role_to_proto
from kvmesh.v1 import common_pb2

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("role", list(WorkerRole))
def test_role_round_trips_through_protobuf(role: WorkerRole) -> None:
    assert role_from_proto(role_to_proto(role)) is role
    assert role_to_proto(role.value) == role_to_proto(role)


def test_an_unspecified_role_is_both() -> None:
    assert role_from_proto(common_pb2.WORKER_ROLE_UNSPECIFIED) is WorkerRole.both
    assert role_to_proto("prefill") == common_pb2.WORKER_ROLE_PREFILL
