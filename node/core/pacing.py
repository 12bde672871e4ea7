"""How often a node may publish a frame to its peers (FramePacer, a token bucket) and start a
database commit (CommitPacer). Pure: time is an argument.

py-libp2p spends about a millisecond of CPU per frame on every node that sends or receives it
(several over GossipSub, which also forwards), whatever the frame's size. So the publisher caps
the frame rate instead of the message rate: while the cap is not reached a frame goes at once (low
latency when the cluster is quiet); once it is, the publisher waits for the next token and
everything queued meanwhile rides in that one frame (throughput under load, at the cost of at most
1/rate of added latency). The cap itself falls as the node's message rate rises. The defaults
are measured (docs/benchmarks.md, "Frame pacing"), a room's members on all 3 nodes: with frames on
direct streams (a third of GossipSub's cost), 200 frames/s at idle falling to 50 by 100 messages/s
per node gave p99 32 ms at 400 sends/s and 51 ms at 2,400, where 100 falling to 20 gave 59 and
72 ms, and 300 to 60 spent the CPU the messages needed. Once database writes left the worker
threads (their tail had hidden the gain), reaching the floor only at 300 messages/s per node took
400 sends/s from p99 25-28 ms to 9-13 ms, with 1,200 and 3,200 sends/s unchanged. Once direct
streams stopped answering every frame with a window update (a frame's CPU fell by ~35%), a floor
of 100 instead of 50 took p99 at 800 sends/s from 19-21 ms to 15.5-16 ms and at 1,600 from 35-36
to 25-30 ms (3 runs each; 400 unchanged, 3,200 within its run-to-run spread of 39-61 ms). A busy
node's messages wait for two clocks in turn, the commit pacer's and then this one; with a floor
(150) above the commit rate (at most 125 commits/s once the commit gap is full, reached at 300
messages/s per node instead of 600), each commit's messages leave in a frame at once, and a
remote recipient waits for the commit alone: at 1,600 sends/s the remote p50 fell from 7 ms above
the sender's node's to 2 ms above it, and p99 (median of 3 runs at 400/800/1,600/3,200 sends/s)
went from 6.3/16.6/29.1/59.1 ms to 5.7/16.5/24.6/39.7 ms. Once frames left libp2p for fast lanes
(node/adapters/lane.py: a frame's CPU at both ends 0.27-0.29 → 0.04-0.06 ms), a frame costs less
than the commit it follows, so the cap rose to 1,000 falling to 500 frames/s, above any commit
rate a node reaches: it no longer shapes traffic, and only bounds a runaway. (With --no-lanes the
measurements above stand: 200 falling to 150.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .envelope import MAX_BUNDLE_BYTES
from .model import Message


REFERENCE_NODES = 3

# (max, min) frames per second a node publishes by default (FramePacer): with frames on fast lanes,
# above any commit rate; with frames on libp2p streams (--no-lanes), what was measured best there
# (the module docstring).
FRAME_CAPS_LANES = (1000.0, 500.0)
FRAME_CAPS_STREAMS = (200.0, 150.0)


@dataclass
class DecayingRate:
    """Events per second, as an exponentially decaying average with time constant window_s
    (time is an argument)."""

    window_s: float = 1.0
    _per_s: float = field(default=0.0, repr=False)
    _noted_at: float | None = field(default=None, repr=False)

    def note(self, count: int, now: float) -> None:
        self._per_s = self.at(now) + count / self.window_s
        self._noted_at = now

    def at(self, now: float) -> float:
        if self._noted_at is None:
            return 0.0
        return self._per_s * math.exp(-max(0.0, now - self._noted_at) / self.window_s)


@dataclass
class FramePacer:
    """A token bucket whose rate falls as the node gets busier: frames are cheap while the node is
    quiet (max_rate: a lone message goes at once), and precious when it is busy (min_rate: each
    frame carries many messages, and the CPU saved keeps the queues short). In between the rate
    falls linearly with the message rate, reaching min_rate at busy_messages_per_s."""

    max_rate: float = FRAME_CAPS_LANES[0]  # frames per second at idle; 0 or less: no cap at all
    # Frames per second at or beyond busy_messages_per_s: above any commit rate CommitPacer lets a
    # node reach (one commit per message while unpaced, one per gap when paced: at most ~460/s at
    # any load, which a unit test checks), so that every commit leaves in a frame at once. (In a cluster of more than
    # REFERENCE_NODES the share below scales it under that: there a commit's messages may wait
    # for a frame again, the price of a cluster-wide frame budget.)
    min_rate: float = FRAME_CAPS_LANES[1]
    busy_messages_per_s: float = 600.0
    burst: float = 4.0                   # frames that may go back to back after a quiet spell
    window_s: float = 1.0                # time constant of the message-rate estimate
    # This node's share of the frame budget. The rates above are a node's in a cluster of up to
    # REFERENCE_NODES; in a bigger one every node receives every other node's frames, so each
    # gets a proportionally smaller share (set_cluster_size) and the cluster's total stays put.
    share: float = 1.0
    _tokens: float | None = field(default=None, repr=False)  # None: never used, a full bucket
    _at: float = field(default=0.0, repr=False)
    _load: DecayingRate | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._load = DecayingRate(self.window_s)

    def set_cluster_size(self, nodes: int) -> None:
        self.share = min(1.0, REFERENCE_NODES / max(1, nodes))

    def note_messages(self, count: int, now: float) -> None:
        """Feeds the message-rate estimate (an exponentially decaying average)."""
        self._load.note(count, now)

    def rate(self, now: float) -> float:
        """Frames per second allowed now."""
        if self.max_rate <= 0:
            return math.inf
        load = self._load.at(now)
        busy = min(1.0, load / self.busy_messages_per_s) if self.busy_messages_per_s > 0 else 1.0
        rate = max(min(self.min_rate, self.max_rate), self.max_rate - (self.max_rate - self.min_rate) * busy)
        return rate * self.share

    def _refill(self, now: float) -> float:
        if self._tokens is None:
            self._tokens, self._at = self.burst, now
        tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate(now))
        self._tokens, self._at = tokens, max(self._at, now)
        return tokens

    def delay(self, now: float) -> float:
        """Seconds to wait before the next frame may go (0.0: now)."""
        if self.max_rate <= 0:
            return 0.0
        tokens = self._refill(now)
        return 0.0 if tokens >= 1.0 - 1e-9 else (1.0 - tokens) / self.rate(now)  # 1e-9: float sums

    def spend(self, now: float) -> None:
        """Records a frame sent at `now` (call after waiting out `delay`)."""
        if self.max_rate <= 0:
            return
        self._tokens = self._refill(now) - 1.0


@dataclass
class CommitPacer:
    """How long the group-commit batcher leaves between the starts of two commits: nothing while
    the node appends fewer than quiet_messages_per_s (a lone send commits at once), rising to
    max_gap_s at busy_messages_per_s. A commit costs the database CPU and an fsync whatever its
    size, and a busy node that commits as fast as it can commits many small batches; measured at
    2,400 sends/s on 3 nodes (docs/benchmarks.md), an 8 ms gap took PostgreSQL from 23% to 19% of
    a core and the nodes from 48% to 45%, and p99 from 110-115 to 94-100 ms. Below the quiet
    rate the gap would only add latency (the whole gap on a lone send), so there is none. The rates were
    300 and 600 until the frame pacer was made to frame every commit at once (FramePacer.min_rate):
    fewer commits are then also fewer frames, and 150/300 kept the p99s at 400-800 sends/s while
    cutting them at 1,600-3,200 (the module docstring). With fast lanes the nodes had ~25 points of
    CPU to spare at 800 sends/s, and 300/600 again took p99 there from 13 to 6-7.6 ms (same-node
    p50 5.5 → 1.1 ms) at 1,600-3,200 unchanged; no gap at all was as fast, for 40 more points of
    node CPU at 1,600 (docs/benchmarks.md). A gap of at most 4 ms instead of 8 then took p99 at
    1,600 sends/s from 15.9 to 9.5-9.9 ms and at 3,200 from 20.6-21.5 to 14.5-15.5 (alternated
    twice), for ~30 more points of node CPU there, and the sweep still held 6,000 sends/s. 2 ms
    (alternated twice at 800/1,600/3,200 sends/s) took p50 at 1,600 from 4.6 to 3.6-3.8 ms but p99
    from 10.1-10.2 to 11.1-13.4 ms, for ~12 more points of node CPU: the processes waited longer
    for a core (run-queue wait 124-126% → 200-208% of a core, summed). All of that was with commit
    first, where every delivery waits for its commit. With early fan-out (the default) nothing is
    delivered later for a longer gap; only the sender's ack is, so there the gap is longer and starts
    sooner (EARLY_FANOUT_PACING, below). `sms node --commit-gap-ms` sets the gap."""

    max_gap_s: float = 0.004
    quiet_messages_per_s: float = 300.0
    busy_messages_per_s: float = 600.0  # FramePacer's too: frames are at their floor from here
    window_s: float = 1.0
    _load: DecayingRate | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._load = DecayingRate(self.window_s)

    def note_messages(self, count: int, now: float) -> None:
        """Messages appended (at the start of a commit)."""
        self._load.note(count, now)

    def gap(self, now: float) -> float:
        """Seconds from one commit's start to the next's, now."""
        load = self._load.at(now)
        if load <= self.quiet_messages_per_s or self.max_gap_s <= 0:
            return 0.0
        span = max(1e-9, self.busy_messages_per_s - self.quiet_messages_per_s)
        return self.max_gap_s * min(1.0, (load - self.quiet_messages_per_s) / span)

    def wait(self, last_start: float | None, now: float) -> float:
        """Seconds to wait before starting a commit now, the previous one having started at
        `last_start` (None: there was none)."""
        if last_start is None:
            return 0.0
        return max(0.0, last_start + self.gap(now) - now)


@dataclass(frozen=True)
class CommitPacing:
    """The shape of a node's commit gap (CommitPacer): none below quiet_messages_per_s appended by
    the node, rising to max_gap_s at busy_messages_per_s."""

    max_gap_s: float
    quiet_messages_per_s: float
    busy_messages_per_s: float

    def __post_init__(self) -> None:
        if self.max_gap_s < 0:
            raise ValueError(f"the commit gap must be >= 0 s, not {self.max_gap_s}")
        if not 0 <= self.quiet_messages_per_s < self.busy_messages_per_s:
            raise ValueError("the commit gap must start at a message rate >= 0 and below the one it is full at")

    def with_max_gap(self, max_gap_s: float) -> "CommitPacing":
        return CommitPacing(max_gap_s, self.quiet_messages_per_s, self.busy_messages_per_s)

    def pacer(self, carry: CommitPacer | None = None) -> CommitPacer:
        """A pacer of this shape; `carry`'s estimate of the node's message rate goes on in it."""
        pacer = CommitPacer(max_gap_s=self.max_gap_s, quiet_messages_per_s=self.quiet_messages_per_s,
                            busy_messages_per_s=self.busy_messages_per_s)
        if carry is not None:
            pacer._load = carry._load
        return pacer


# The commit pacing by default (NodeConfig.commit_pacing). With commit first the gap is in every
# delivery of a busy node: what CommitPacer's docstring measured, 4 ms from 300 to 600 messages/s.
# With early fan-out it is in the sender's ack only, as long as peers get the node's frames (else
# its own clients wait for the commit: OwnDeliveries, so a lone node paces as commit first does;
# Node.serve_publisher switches). There a gap of 16 ms took PostgreSQL from 19%
# to 10% of a core at 1,600 sends/s on 3 nodes, the run-queue wait from ~225% to ~145% of a core
# and delivery p99 from 7.5-8.4 to 5.3-6.2 ms, for ~5 ms more ack p99 (alternated three times with
# NATS in each run); starting it at 100 messages/s per node, full at 300, then took PostgreSQL at
# 800 sends/s from 16-18% to 8-10% and the p99 ratio to NATS from 1.74-1.80 to 1.13-1.64 (three
# alternations), for ~10 ms more ack p99 there (docs/benchmarks.md, "Latest").
COMMIT_FIRST_PACING = CommitPacing(CommitPacer.max_gap_s, CommitPacer.quiet_messages_per_s,
                                   CommitPacer.busy_messages_per_s)
EARLY_FANOUT_PACING = CommitPacing(0.016, 100.0, 300.0)


# What one message may add to a room frame beyond its body: ids, sender, txn id, numbers.
_MESSAGE_OVERHEAD = 512


def chunk_messages(messages: list[Message], limit: int = MAX_BUNDLE_BYTES // 2) -> list[list[Message]]:
    """Splits one room's messages, in order, into runs whose encoded frame stays under `limit`
    bytes, so that a frame always fits in a bundle."""
    chunks: list[list[Message]] = []
    size = limit  # forces a new chunk for the first message
    for m in messages:
        cost = len(m.body.encode("utf-8", "surrogatepass")) + _MESSAGE_OVERHEAD
        if size + cost > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(m)
        size += cost
    return chunks
