import pytest

from kvmesh.errors import AuthenticationError, RateLimitedError
from kvmesh.gateway.admission import ANONYMOUS, Admission, key_id

pytestmark = pytest.mark.unit


def test_no_keys_means_no_auth() -> None:
    assert Admission([], None, None, 1).authenticate(None) == ANONYMOUS


def test_several_keys_bearer_only() -> None:
    a = Admission(["k1", "k2"], None, None, 1)
    assert a.authenticate("Bearer k1") == key_id("k1")
    assert a.authenticate("bearer k2") == key_id("k2")
    for bad in (None, "k1", "Basic k1", "Bearer ", "Bearer k3", "Bearer k1x"):
        with pytest.raises(AuthenticationError):
            a.authenticate(bad)
    assert "k1" not in key_id("k1")


def test_stream_limit_per_key_and_release() -> None:
    a = Admission(["k"], None, 2, retry_after_s=7)
    s1, s2 = a.admit("a", stream=True), a.admit("a", stream=True)
    with pytest.raises(RateLimitedError) as err:
        a.admit("a", stream=True)
    assert err.value.retry_after_s == 7
    a.admit("b", stream=True)  # another key has its own budget
    a.admit("a", stream=False).release()  # non-streaming requests are not counted
    s1.release()
    s1.release()  # idempotent
    a.admit("a", stream=True)
    s2.release()


def test_overload_limit() -> None:
    a = Admission([], 1, None, 1)
    slot = a.admit(ANONYMOUS, stream=False)
    with pytest.raises(RateLimitedError, match="overloaded"):
        a.admit(ANONYMOUS, stream=False)
    slot.release()
    assert a.in_flight == 0
    a.admit(ANONYMOUS, stream=False)
