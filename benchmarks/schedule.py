"""Pure workload planning: who is in which room, who sends, and when. No clocks, no I/O.

A `Plan` says which clients exist (each on a node, in a set of rooms) and which of them send into
which room. A schedule is the open-loop send plan: message m is due at `times[m]` seconds after the
start, whatever happened to earlier messages. The first `warmup_s` seconds are warm-up and are not
measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MAX_MESSAGES = 2_000_000  # one point never schedules more than this


@dataclass(frozen=True)
class Workload:
    clients: int = 30          # C: WebSocket clients (recipients)
    senders: int = 6           # S: how many of them send
    rooms: int = 3             # K
    rate: float = 100.0        # R: offered sends per second, all senders together
    body_bytes: int = 200      # B
    duration_s: float = 10.0   # T: measured window
    warmup_s: float = 2.0      # not measured
    drain_s: float = 5.0       # after the last send: how long to wait for stragglers
    max_in_flight: int = 256   # sends awaiting their ack, all senders together
    arrivals: str = "uniform"  # "uniform" (evenly spaced) or "poisson"
    seed: int = 1

    def validate(self) -> "Workload":
        problems = []
        if self.clients < 2:
            problems.append("need at least 2 clients")
        if not 1 <= self.senders <= self.clients:
            problems.append("senders must be between 1 and clients")
        if not 1 <= self.rooms <= self.clients:
            problems.append("rooms must be between 1 and clients")
        if self.rate <= 0:
            problems.append("rate must be > 0")
        if not 32 <= self.body_bytes <= 60_000:
            problems.append("body size must be 32..60000 bytes")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.drain_s < 0:
            problems.append("durations must be positive")
        if self.max_in_flight < 1:
            problems.append("max_in_flight must be >= 1")
        if self.arrivals not in ("uniform", "poisson"):
            problems.append("arrivals must be 'uniform' or 'poisson'")
        if self.rate * (self.warmup_s + self.duration_s) > MAX_MESSAGES:
            problems.append(f"a point may schedule at most {MAX_MESSAGES} messages")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class Plan:
    """client_nodes[c]: the node (index) client c connects to; client_rooms[c]: the rooms it is in;
    senders[s] = (client, room) of sender s."""

    client_nodes: tuple[int, ...]
    client_rooms: tuple[frozenset[int], ...]
    senders: tuple[tuple[int, int], ...]
    rooms: int
    _members: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        members = tuple(tuple(c for c, rs in enumerate(self.client_rooms) if r in rs) for r in range(self.rooms))
        object.__setattr__(self, "_members", members)

    @property
    def clients(self) -> int:
        return len(self.client_nodes)

    def members(self, room: int) -> tuple[int, ...]:
        return self._members[room]

    def recipients(self, sender: int) -> tuple[int, ...]:
        """Who must receive a message from sender `sender`: every member of its room but itself."""
        client, room = self.senders[sender]
        return tuple(c for c in self._members[room] if c != client)


def client_plan(workload: Workload, nodes: int) -> Plan:
    """C clients over `nodes` nodes and K rooms: client c is member j = c // K of room r = c % K
    and sits on node (r + j) % N; the first S clients send, each into its own room.

    A room's members go to consecutive nodes, so every room spans min(N, its members) nodes
    whatever K and N are, and most deliveries cross the mesh. (Node c % N did not: with K = N = 3
    each room lived on one node and no delivery crossed it.)"""
    if nodes < 1:
        raise ValueError("need at least one node")
    c, k = workload.clients, workload.rooms
    return Plan(
        client_nodes=tuple((i % k + i // k) % nodes for i in range(c)),
        client_rooms=tuple(frozenset({i % k}) for i in range(c)),
        senders=tuple((i, i % k) for i in range(workload.senders)),
        rooms=k,
    )


def host_plan(workload: Workload, hosts: int) -> Plan:
    """For the raw GossipSub baseline: each host is one 'client' subscribed to every room; sender s
    publishes from host s % H into room s % K."""
    if hosts < 2:
        raise ValueError("need at least two hosts")
    k = workload.rooms
    return Plan(
        client_nodes=tuple(range(hosts)),
        client_rooms=tuple(frozenset(range(k)) for _ in range(hosts)),
        senders=tuple((s % hosts, s % k) for s in range(workload.senders)),
        rooms=k,
    )


@dataclass(frozen=True)
class Schedule:
    times: tuple[float, ...]     # due time of message m, seconds from the start, non-decreasing
    senders: tuple[int, ...]     # sender index of message m
    first_measured: int          # messages before this index are warm-up

    def __len__(self) -> int:
        return len(self.times)


def make_schedule(workload: Workload, senders: int | None = None) -> Schedule:
    """Open-loop arrivals at `rate` for warmup + duration seconds, senders taking turns.

    uniform: message m at m / rate. poisson: exponential gaps with mean 1 / rate (seeded, so a run
    is reproducible). Either way the count is bounded by rate * (warmup + duration) + 1."""
    workload.validate()
    s = workload.senders if senders is None else senders
    total_s = workload.warmup_s + workload.duration_s
    limit = min(MAX_MESSAGES, int(workload.rate * total_s) + 1)
    times: list[float] = []
    if workload.arrivals == "uniform":
        gap = 1.0 / workload.rate
        times = [m * gap for m in range(limit) if m * gap < total_s]
    else:
        rng = random.Random(workload.seed)
        t = 0.0
        while len(times) < limit:
            t += rng.expovariate(workload.rate)
            if t >= total_s:
                break
            times.append(t)
    first = next((m for m, t in enumerate(times) if t >= workload.warmup_s), len(times))
    return Schedule(times=tuple(times), senders=tuple(m % s for m in range(len(times))), first_measured=first)


def message_body(point: int, m: int, size: int) -> str:
    """The body of message m of point `point`: a parseable key, padded to `size` bytes (ASCII)."""
    key = f"b{point}.{m}|"
    if len(key) > size:
        raise ValueError("body size too small for the key")
    return key + "x" * (size - len(key))


def parse_body(body: str) -> tuple[int, int] | None:
    """(point, m) from a body made by message_body, or None for anything else."""
    if not body.startswith("b"):
        return None
    head, sep, _ = body.partition("|")
    if not sep:
        return None
    p, dot, m = head[1:].partition(".")
    if not dot or not p.isdigit() or not m.isdigit():
        return None
    return int(p), int(m)
