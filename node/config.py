"""One frozen, validated configuration object per node, built by the CLI and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .core.pacing import (COMMIT_FIRST_PACING, EARLY_FANOUT_PACING, FRAME_CAPS_LANES, FRAME_CAPS_STREAMS,
                          CommitPacing)
from .errors import BadRequest

DEFAULT_HTTP_PORT = 8081
DEFAULT_P2P_PORT = 4101
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    data_dir: Path
    etcd_url: str
    db_dsn: str
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    p2p_host: str = "127.0.0.1"
    p2p_port: int = DEFAULT_P2P_PORT
    bootstrap: tuple[str, ...] = ()
    secret: str | None = field(default=None, repr=False)  # 64 hex chars; never logged
    session_ttl_s: int = 7 * 24 * 3600
    allowed_origins: tuple[str, ...] = ()
    group_commit: bool = True
    db_wire: bool = True  # group-commit batches on a connection driven by the event loop (pgwire.py)
    publish_window_ms: float = 0.0  # see docs/protocol.md, "Pacing"
    # Frames (bundles) this node publishes per second at most: max at idle, falling to
    # min as the node nears busy_messages_per_s. Under load, messages wait up to 1/rate for the
    # next frame instead of each costing a frame (node/core/pacing.py). None: what was measured
    # best for the frames' carrier (frame_caps: fast lanes or libp2p streams).
    max_frames_per_s: float | None = None
    min_frames_per_s: float | None = None
    busy_messages_per_s: float = 600.0
    # The most a busy node leaves between the starts of two commits (CommitPacer); 0: commit as
    # soon as the previous commit is done, at any load (lower latency, more CPU per message).
    # None: the default for the fan-out mode (commit_pacing).
    commit_gap_ms: float | None = None
    # Peers up to which a node pushes its frames on a direct stream to each (more: GossipSub only);
    # 0 turns direct push off (docs/protocol.md, "Direct push").
    direct_max_peers: int = 16  # p2p.DIRECT_MAX_PEERS (not imported here: it would load libp2p)
    # Direct frames on fast lanes: plain TCP, sealed with a key handed over on libp2p (docs/protocol.md,
    # "Fast lane"), accepted on lane_port of p2p_host (0: any free port).
    lanes: bool = True
    lane_port: int = 0
    # Fan a new message out to clients and peers while its commit runs (acks still wait for the
    # commit): delivery does not wait for the disk. Peers keep what they got until the origin's
    # stored mark covers it and write it themselves if it does not (custody), so a message seen
    # misses history only if its node's machine, or it and every peer that got it, fail within
    # seconds and its sender never retries (docs/protocol.md, "Early fan-out"). False: commit first.
    early_fanout: bool = True
    retention_days: float | None = None  # purge history older than this; None keeps everything
    rate_limit_per_s: float = 200.0  # per user, cluster-wide, for requests that change state; 0: off

    def validate(self) -> "NodeConfig":
        problems = []
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"node name {self.name!r} must be letters, digits, - or _")
        for what, port in (("--http-port", self.http_port), ("--p2p-port", self.p2p_port)):
            if not 1 <= port <= 65535:
                problems.append(f"{what} {port} is not a TCP port")
        if not self.etcd_url.startswith(("http://", "https://")):
            problems.append(f"--etcd {self.etcd_url!r} must be an http(s):// URL")
        if not self.db_dsn.startswith(("postgresql://", "postgres://")):
            problems.append(f"--db {self.db_dsn!r} must be a postgresql:// DSN")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                problems.append(f"--bootstrap {addr!r} must be a multiaddr ending in /p2p/PEER_ID")
        if self.retention_days is not None and self.retention_days <= 0:
            problems.append("--retention-days must be positive")
        if self.max_frames_per_s is not None and self.max_frames_per_s < 0:
            problems.append("--max-frames-per-s must be 0 (no cap) or positive")
        if self.min_frames_per_s is not None and not 0 < self.min_frames_per_s:
            problems.append("--min-frames-per-s must be positive")
        if self.commit_gap_ms is not None and not 0 <= self.commit_gap_ms <= 1000:
            problems.append("--commit-gap-ms must be between 0 (no gap) and 1000")
        if not 0 < self.busy_messages_per_s:
            problems.append("--busy-messages-per-s must be positive")
        if not 0 <= self.lane_port <= 65535 or (self.lane_port and self.lane_port == self.p2p_port):
            problems.append(f"--lane-port {self.lane_port} must be 0 (any free port) or a TCP port other than --p2p-port")
        if self.direct_max_peers < 0:
            problems.append("--direct-max-peers must be 0 (never push directly) or positive")
        if not 0 <= self.publish_window_ms <= 1000:
            problems.append("--publish-window-ms must be between 0 and 1000")
        if self.rate_limit_per_s < 0:
            problems.append("--rate-limit must be 0 (off) or positive")
        if self.session_ttl_s < 60:
            problems.append("session TTL must be at least 60 s")
        if problems:
            raise BadRequest("invalid node configuration: " + "; ".join(problems))
        return self

    def frame_caps(self) -> tuple[float, float]:
        """(max, min) frames per second: the ones given, else the defaults for the carrier
        (cheap frames on fast lanes allow many more than libp2p streams do)."""
        default_max, default_min = FRAME_CAPS_LANES if self.lanes else FRAME_CAPS_STREAMS
        return (default_max if self.max_frames_per_s is None else self.max_frames_per_s,
                default_min if self.min_frames_per_s is None else self.min_frames_per_s)

    def commit_pacing(self, deliveries_wait: bool | None = None) -> CommitPacing:
        """When this node spaces its commits: the default for whether deliveries wait for commits
        (by default: with commit first), with the largest gap given. Where only acks wait (early
        fan-out, peers getting the frames) a gap saves the database and the nodes CPU for nothing
        else, so it is longer and starts at a lower load (node/core/pacing.py)."""
        waits = not self.early_fanout if deliveries_wait is None else deliveries_wait
        pacing = COMMIT_FIRST_PACING if waits else EARLY_FANOUT_PACING
        return pacing if self.commit_gap_ms is None else pacing.with_max_gap(self.commit_gap_ms / 1000)

    @property
    def identity_path(self) -> Path:
        return self.data_dir / "node.key"


def read_secret(secret_file: Path | None, env: dict[str, str] | None = None) -> str | None:
    """The cluster secret comes from a file or SMS_CLUSTER_SECRET, never from the command line."""
    env = os.environ if env is None else env
    if secret_file is not None:
        try:
            return secret_file.read_text().strip()
        except OSError as exc:
            raise BadRequest(f"cannot read the cluster secret file {secret_file}: {exc.strerror}") from None
    value = env.get("SMS_CLUSTER_SECRET")
    return value.strip() if value else None
