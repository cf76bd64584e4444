"""ACK/NACK bookkeeping of one ADS stream (pure): what was sent, applied, rejected."""

from __future__ import annotations

import pytest

from kvmesh.edge.acks import Answer, StreamState
from kvmesh.edge.resources import CLUSTER, ENDPOINT, LISTENER, ORDER, ROUTE

pytestmark = pytest.mark.unit


def subscribed_to_all() -> StreamState:
    state = StreamState(ORDER)
    for type_url in (ROUTE, LISTENER, ENDPOINT, CLUSTER):  # Envoy's own order varies
        assert state.answer(type_url, "", "") is Answer.SUBSCRIBE
    return state


def ack_all(state: StreamState, sent: list[tuple[str, str]], version: int) -> None:
    for type_url, nonce in sent:
        assert state.answer(type_url, str(version), nonce) is Answer.ACK


def test_nothing_is_sent_before_a_version_exists() -> None:
    assert subscribed_to_all().due(0) == []


def test_a_version_goes_out_once_per_type_clusters_first() -> None:
    state = subscribed_to_all()
    sent = state.due(1)
    assert [t for t, _ in sent] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    assert len({nonce for _, nonce in sent}) == 4  # one nonce per response
    assert state.due(1) == []  # already sent
    assert not state.applied(1)
    ack_all(state, sent, 1)
    assert state.applied(1) and state.acked == dict.fromkeys(ORDER, "1")


def test_a_nack_keeps_the_last_good_version_and_envoys_error() -> None:
    state = subscribed_to_all()
    ack_all(state, state.due(1), 1)
    bad = dict(state.due(2))
    # Envoy rejects the clusters of version 2: it names the version it still runs.
    assert state.answer(CLUSTER, "1", bad[CLUSTER], "Invalid duration") is Answer.NACK
    assert state.acked[CLUSTER] == "1"
    assert state.nacks == {CLUSTER: ["Invalid duration"]} and state.rejected == {CLUSTER: [2]}
    assert not state.applied(2)
    assert state.due(2) == []  # a rejected version is not sent again
    good = state.due(3)  # the next version supersedes it
    assert [t for t, _ in good] == list(ORDER)
    ack_all(state, good, 3)
    assert state.applied(3)


def test_an_answer_to_a_superseded_response_is_ignored() -> None:
    state = subscribed_to_all()
    old = dict(state.due(1))
    state.due(2)
    assert state.answer(CLUSTER, "1", old[CLUSTER]) is Answer.STALE
    assert state.answer(CLUSTER, "1", old[CLUSTER], "late error") is Answer.STALE
    assert CLUSTER not in state.acked and not state.nacks


def test_types_subscribed_later_get_the_current_version() -> None:
    state = StreamState(ORDER)
    state.answer(CLUSTER, "", "")
    assert [t for t, _ in state.due(1)] == [CLUSTER]
    state.answer(LISTENER, "", "")
    assert [t for t, _ in state.due(1)] == [LISTENER]
