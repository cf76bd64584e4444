import pytest

from kvmesh.bench.routing.oracle import oracle_hit_rate

pytestmark = pytest.mark.unit


def test_only_first_time_blocks_miss_and_the_last_token_is_always_computed() -> None:
    a = list(range(100, 112))            # 3 blocks of 4
    b = a[:8] + [7, 7, 7, 7, 7]          # shares 2 blocks with a
    # a: cold. b: 2 blocks hit. a again: 2 of 3 blocks (its last token is computed).
    assert oracle_hit_rate([a, b, a], 4) == pytest.approx((0 + 8 + 8) / (12 + 13 + 12))
    assert oracle_hit_rate([], 4) == 0.0
    assert oracle_hit_rate([b, a], 4) == pytest.approx(8 / 25)
