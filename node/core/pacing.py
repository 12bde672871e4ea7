"""How often a node may publish a GossipSub frame: a token bucket, pure (time is an argument).

py-libp2p spends milliseconds of CPU per GossipSub frame on every node that sends, forwards or
receives it, whatever the frame's size. So the publisher caps the frame rate instead of the message
rate: while the cap is not reached a frame goes at once (low latency when the cluster is quiet);
once it is, the publisher waits for the next token and everything queued meanwhile rides in that
one frame (throughput under load, at the cost of at most 1/rate of added latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .envelope import MAX_BUNDLE_BYTES
from .model import Message


@dataclass
class FramePacer:
    rate_per_s: float          # frames per second on average; 0 or less: no cap
    burst: float = 4.0         # frames that may go back to back after a quiet spell
    _tokens: float | None = field(default=None, repr=False)  # None: never used, a full bucket
    _at: float = field(default=0.0, repr=False)

    def _refill(self, now: float) -> float:
        if self._tokens is None:
            self._tokens, self._at = self.burst, now
        tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate_per_s)
        self._tokens, self._at = tokens, max(self._at, now)
        return tokens

    def delay(self, now: float) -> float:
        """Seconds to wait before the next frame may go (0.0: now)."""
        if self.rate_per_s <= 0:
            return 0.0
        tokens = self._refill(now)
        return 0.0 if tokens >= 1.0 - 1e-9 else (1.0 - tokens) / self.rate_per_s  # 1e-9: float sums

    def spend(self, now: float) -> None:
        """Records a frame sent at `now` (call after waiting out `delay`)."""
        if self.rate_per_s <= 0:
            return
        self._tokens = self._refill(now) - 1.0


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
