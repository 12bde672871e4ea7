import pytest

from sms.node.core.ratelimit import RateLimiter
from sms.node.errors import RateLimited


def test_burst_then_refill_then_retry_after() -> None:
    rl = RateLimiter(rate_per_s=10, burst=5)
    for _ in range(5):
        rl.check("u", 0)
    with pytest.raises(RateLimited) as err:
        rl.check("u", 0)
    assert 90 <= err.value.retry_after_ms <= 101
    rl.check("u", 100)  # one token back after 100 ms
    rl.check("v", 0)  # others are unaffected


def test_the_limit_is_shared_across_nodes() -> None:
    rl = RateLimiter(rate_per_s=30, burst=9)
    for _ in range(3):
        rl.check("u", 0, nodes=3)
    with pytest.raises(RateLimited):
        rl.check("u", 0, nodes=3)
