"""What the load generator saw during one point, and the numbers it adds up to. Pure: times are
arguments (seconds on one monotonic clock), nothing here reads a clock or does I/O.

Every system under test (sms, NATS JetStream, raw GossipSub) is measured through this one class, so
loss, duplicates and latency mean the same thing for all of them:

- a message is *sent* when the generator starts writing it; its latency is delivery time minus that
  send time, per recipient (every member of the room but the sender);
- a recipient that has not seen a sent message when the point ends (after the drain wait) is a
  *loss*; a second copy at one recipient is a *duplicate*;
- a send refused or failed (non-2xx, timeout, broken connection) expects no deliveries and counts as
  a send error; a send the generator could not start because `max_in_flight` sends were already
  waiting counts as not sent. Either makes the point fail, like a loss;
- *lag* is how late the generator started a send against its open-loop schedule: large lag means
  the generator, not the system, was the bottleneck.
"""

from __future__ import annotations

from .schedule import Plan, Schedule
from .stats import cdf_points, summarize_ms


class Recorder:
    def __init__(self, plan: Plan, schedule: Schedule, point: int, start_at: float = 0.0) -> None:
        self.plan = plan
        self.schedule = schedule
        self.point = point
        self.start_at = start_at
        n = len(schedule)
        self._recipients = [frozenset(plan.recipients(s)) for s in range(len(plan.senders))]
        self.sent_at: list[float | None] = [None] * n
        self.acked_at: list[float | None] = [None] * n
        self.failed: list[bool] = [False] * n
        self.skipped: list[bool] = [False] * n
        self.deliveries: dict[int, dict[int, float]] = {}
        self.duplicates = 0
        self.duplicates_measured = 0
        self.strays = 0          # bodies that are not ours, or from another point
        self.echoes = 0          # a sender's own copy, or a client outside the room
        self.errors: dict[str, int] = {}
        self.expected_total = 0  # deliveries owed by sends that did not fail
        self.received_total = 0  # first copies received of those

    # -- events

    def recipients_of(self, m: int) -> frozenset[int]:
        return self._recipients[self.schedule.senders[m]]

    def on_send(self, m: int, t: float) -> None:
        self.sent_at[m] = t
        self.expected_total += len(self.recipients_of(m))

    def on_skip(self, m: int) -> None:
        self.skipped[m] = True

    def on_ack(self, m: int, t: float, ok: bool = True, error: str | None = None) -> None:
        if ok:
            self.acked_at[m] = t
            return
        if not self.failed[m]:
            self.failed[m] = True
            got = self.deliveries.get(m, {})
            self.expected_total -= len(self.recipients_of(m))
            self.received_total -= len(got)
        key = error or "error"
        self.errors[key] = self.errors.get(key, 0) + 1

    def on_delivery(self, client: int, m: int, t: float) -> None:
        if not 0 <= m < len(self.sent_at):
            self.strays += 1
            return
        if client not in self.recipients_of(m):
            self.echoes += 1
            return
        got = self.deliveries.setdefault(m, {})
        if client in got:
            self.duplicates += 1
            if m >= self.schedule.first_measured:
                self.duplicates_measured += 1
            return
        got[client] = t
        if self.sent_at[m] is not None and not self.failed[m]:
            self.received_total += 1

    def on_body(self, client: int, body: str, t: float, parse) -> None:
        """A delivered body: parse(body) -> (point, m) or None."""
        key = parse(body)
        if key is None or key[0] != self.point:
            self.strays += 1
            return
        self.on_delivery(client, key[1], t)

    @property
    def outstanding(self) -> int:
        """Deliveries still owed by sends that were made and did not fail."""
        return self.expected_total - self.received_total

    # -- exchange (worker processes send their part to the coordinator)

    def export(self) -> dict:
        return {
            "sends": [[m, t, self.acked_at[m], self.failed[m]] for m, t in enumerate(self.sent_at) if t is not None],
            "skips": [m for m, s in enumerate(self.skipped) if s],
            "deliveries": [[c, m, t] for m, got in self.deliveries.items() for c, t in got.items()],
            "duplicates": self.duplicates,
            "duplicates_measured": self.duplicates_measured,
            "strays": self.strays,
            "echoes": self.echoes,
            "errors": self.errors,
        }

    def merge(self, part: dict) -> None:
        for m, t, acked, failed in part["sends"]:
            self.on_send(m, t)
            if failed:
                self.on_ack(m, acked or t, ok=False)
            elif acked is not None:
                self.on_ack(m, acked)
        for m in part["skips"]:
            self.on_skip(m)
        for c, m, t in part["deliveries"]:
            self.on_delivery(c, m, t)
        self.duplicates += part["duplicates"]
        self.duplicates_measured += part["duplicates_measured"]
        self.strays += part["strays"]
        self.echoes += part["echoes"]
        for k, v in part["errors"].items():
            self.errors[k] = self.errors.get(k, 0) + v

    # -- results

    def summary(self, duration_s: float, cdf: int = 200) -> dict:
        first = self.schedule.first_measured
        n = len(self.sent_at)
        latencies: list[float] = []
        by_path: tuple[list[float], list[float]] = ([], [])  # recipient on the sender's node, on another
        nodes = self.plan.client_nodes
        firsts: list[float] = []  # per message: to its first recipient
        spreads: list[float] = []  # per delivery: after its message's first recipient
        acks: list[float] = []
        lags: list[float] = []
        sent = acked = failed = skipped = expected = delivered = 0
        for m in range(first, n):
            if self.skipped[m]:
                skipped += 1
                continue
            t = self.sent_at[m]
            if t is None:
                continue  # not reached (worker-local schedules leave others' messages empty)
            sent += 1
            lags.append(max(0.0, t - (self.start_at + self.schedule.times[m])))
            if self.failed[m]:
                failed += 1
                continue
            if self.acked_at[m] is not None:
                acked += 1
                acks.append(self.acked_at[m] - t)
            want = self.recipients_of(m)
            expected += len(want)
            got = self.deliveries.get(m, {})
            sender_node = nodes[self.plan.senders[self.schedule.senders[m]][0]]
            for c, td in got.items():
                delivered += 1
                latencies.append(td - t)
                by_path[nodes[c] != sender_node].append(td - t)
            if got:
                first_at = min(got.values())
                firsts.append(first_at - t)
                spreads.extend(td - first_at for td in got.values())
        measured_total = n - first
        return {
            "scheduled": measured_total,
            "sent": sent,
            "acked": acked,
            "send_errors": failed,
            "error_kinds": dict(self.errors),
            "not_sent": skipped,
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "loss_ratio": round((expected - delivered) / expected, 6) if expected else 0.0,
            "duplicates": self.duplicates_measured,
            "delivery_ms": summarize_ms(latencies),
            # The same deliveries split by path: to a client of the sender's own node, and to a
            # client of another node (through the mesh): where the latency comes from.
            "delivery_ms_same_node": summarize_ms(by_path[0]),
            "delivery_ms_other_node": summarize_ms(by_path[1]),
            # Each message's wait until its first recipient had it (leaving the sender and its
            # node), and each delivery's wait beyond that (reaching every other member): the
            # two halves of a delivery's latency, so a tail can be told to be one or the other.
            "first_delivery_ms": summarize_ms(firsts),
            "fanout_spread_ms": summarize_ms(spreads),
            "ack_ms": summarize_ms(acks),
            "lag_ms": summarize_ms(lags),
            "throughput": {
                "sends_per_s": round(sent / duration_s, 2),
                "acks_per_s": round(acked / duration_s, 2),
                "deliveries_per_s": round(delivered / duration_s, 2),
            },
            "cdf_ms": cdf_points(latencies, cdf) if cdf else [],
        }
