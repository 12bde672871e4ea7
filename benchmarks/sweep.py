"""Pure sweep logic: did a point hold, which rate comes next, which rate is the answer.

A point *holds* when its delivery p99 is at most `p99_limit_ms`, nothing was lost, nothing failed
and the generator started every send (see recorder.py). The sweep multiplies the offered rate by
`factor` while points hold; after the first failure it bisects between the last rate that held and
the first that failed for `refine` more points. It stops by itself: at most `max_points` points,
never above `max_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

P99_LIMIT_MS = 100.0


@dataclass(frozen=True)
class SweepPolicy:
    start_rate: float = 50.0
    factor: float = 2.0
    max_rate: float = 20_000.0
    max_points: int = 10
    refine: int = 1
    p99_limit_ms: float = P99_LIMIT_MS
    max_loss_ratio: float = 0.0

    def validate(self) -> "SweepPolicy":
        if self.start_rate <= 0 or self.factor <= 1 or self.max_rate < self.start_rate:
            raise ValueError("need 0 < start_rate <= max_rate and factor > 1")
        if self.max_points < 1 or self.refine < 0:
            raise ValueError("max_points >= 1 and refine >= 0")
        return self


def verdict(point: dict, p99_limit_ms: float = P99_LIMIT_MS, max_loss_ratio: float = 0.0) -> tuple[bool, list[str]]:
    """(held, reasons it did not) for a point summary from Recorder.summary."""
    reasons = []
    p99 = point["delivery_ms"]["p99"]
    if point["delivered"] == 0:
        reasons.append("nothing delivered")
    elif p99 is None or p99 > p99_limit_ms:
        reasons.append(f"p99 {p99} ms > {p99_limit_ms:g} ms")
    if point["lost"] > 0 and point["loss_ratio"] > max_loss_ratio:
        reasons.append(f"lost {point['lost']} of {point['expected_deliveries']} deliveries")
    if point["send_errors"]:
        kinds = point.get("error_kinds") or {}
        detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))
        reason = f"{point['send_errors']} sends failed" + (f" ({detail})" if detail else "")
        if kinds.get("http_429"):
            # The usual cause with --cluster: a cluster started by hand keeps the per-user limit.
            reason += (" - the cluster's per-user rate limit refused sends: start it with "
                       "SMS_RATE_LIMIT=1000000 in its environment, as sms bench does for the clusters it starts")
        reasons.append(reason)
    if point["not_sent"]:
        reasons.append(f"{point['not_sent']} sends not started (in-flight limit)")
    return (not reasons, reasons)


@dataclass
class SweepState:
    policy: SweepPolicy
    tried: list[tuple[float, bool]] = field(default_factory=list)

    def record(self, rate: float, held: bool) -> None:
        self.tried.append((rate, held))

    @property
    def best(self) -> float | None:
        """The highest rate that held (None if none did)."""
        good = [r for r, ok in self.tried if ok]
        return max(good) if good else None

    @property
    def lowest_failure(self) -> float | None:
        bad = [r for r, ok in self.tried if not ok]
        return min(bad) if bad else None

    def next_rate(self) -> float | None:
        """The next offered rate to try, or None when the sweep is done."""
        p = self.policy
        if len(self.tried) >= p.max_points:
            return None
        if not self.tried:
            return p.start_rate
        fail = self.lowest_failure
        if fail is None:
            last = max(r for r, _ in self.tried)
            if last >= p.max_rate:
                return None
            return round(min(last * p.factor, p.max_rate), 3)
        best = self.best
        if best is None:
            return None  # even the first rate failed
        first_fail_index = next(i for i, (_, ok) in enumerate(self.tried) if not ok)
        refined = len(self.tried) - 1 - first_fail_index
        if refined >= p.refine or fail - best < max(1.0, 0.05 * best):
            return None
        return round((best + fail) / 2, 3)

    def stop_reason(self) -> str:
        p = self.policy
        if self.tried and self.best is None:
            return "the first rate already failed"
        if self.lowest_failure is None:
            if len(self.tried) >= p.max_points:
                return "max_points reached while still holding"
            return "max_rate reached while still holding"
        return "failed above the best rate"
