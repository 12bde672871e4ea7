"""Per-user rate limits: a token bucket per user, pure (time is an argument).

The limit is cluster-wide: with N admitted nodes, each node gives every user 1/N of the rate and of
the burst, so a user spreading requests over every node still gets no more than the whole. (A user
who sticks to one node gets 1/N of it; clients that spread load should spread it evenly.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RateLimited


@dataclass
class RateLimiter:
    rate_per_s: float = 200.0   # cluster-wide, per user
    burst: float = 400.0        # cluster-wide, per user
    max_users: int = 100_000
    _buckets: dict[str, tuple[float, int]] = field(default_factory=dict)  # user -> (tokens, at_ms)

    def check(self, user_id: str, now_ms: int, nodes: int = 1, cost: float = 1.0) -> None:
        """Takes `cost` tokens from the user's bucket or raises RateLimited with retry_after_ms."""
        share = max(1, nodes)
        rate = self.rate_per_s / share
        burst = max(1.0, self.burst / share)
        tokens, at = self._buckets.get(user_id, (burst, now_ms))
        tokens = min(burst, tokens + max(0, now_ms - at) * rate / 1000)
        if tokens < cost:
            wait_ms = int((cost - tokens) * 1000 / rate) + 1
            self._buckets[user_id] = (tokens, now_ms)
            raise RateLimited(f"too many requests; retry in {wait_ms} ms", retry_after_ms=wait_ms)
        self._buckets[user_id] = (tokens - cost, now_ms)
        if len(self._buckets) > self.max_users:
            # Forget the oldest-touched half; a forgotten user starts with a full bucket.
            for key in sorted(self._buckets, key=lambda k: self._buckets[k][1])[: self.max_users // 2]:
                del self._buckets[key]
