"""The open-loop load engine, written against anyio so the same code drives sms and the GossipSub
baseline (trio) and the NATS baseline (nats-py is asyncio-only).

A transport connects the clients and exposes:
    sink: Callable[[client, body, t], None]    set by the engine; receivers call it per delivery,
                                               with t = time.monotonic() taken on receipt
    async send(sender, body, txn) -> None      returns once the system acknowledged the send;
                                               raises on refusal or failure

The engine walks the schedule by the clock: it starts every send that is due without waiting for
earlier acks, keeps at most `max_in_flight` sends waiting (a due send beyond that is recorded as not
sent), bounds every send by `send_timeout_s`, then waits for stragglers until every owed delivery
arrived or `drain_s` passed. Everything is bounded in count (the schedule) and time.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Awaitable, Callable, Protocol

import anyio

from .recorder import Recorder
from .schedule import Plan, Schedule, Workload, make_schedule, message_body, parse_body

clock = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine


class Transport(Protocol):
    sink: Callable[[int, str, float], None] | None

    async def send(self, sender: int, body: str, txn: str) -> None: ...


# A transport may also offer a fast path, used when its `can_send_nowait` is true:
#     send_nowait(sender, body, txn, done) -> None    queues the send and returns at once; calls
#                                                     done(None) on the ack, done(exc) on failure
# The engine then needs no task and no cancel scope per send (at 2,000 sends/s these were a
# fifth of the generator's CPU); it times sends out itself.


WindowHook = Callable[[float, float], Awaitable[None]]


def error_kind(exc: BaseException) -> str:
    """How a failed send is counted: the error's `kind` (e.g. http_403) or its class name."""
    return getattr(exc, "kind", None) or type(exc).__name__


class OpenLoop:
    """The bookkeeping of one point's open loop, without clock or I/O (times are arguments): which
    sends are due, which of them start and which are not sent (`max_in_flight` reached), the sends
    awaiting an answer and their timeouts. Both run_point here and benchmarks/wsloop.py walk a
    schedule with it, so a point means the same whichever loop drives it.

    A send started with `start(m, now)` is answered once: `answered(m, error, now)` on its ack or
    failure, or `expire(now)` after `send_timeout_s`; whichever comes second is ignored."""

    def __init__(self, rec: Recorder, workload: Workload, point: int, *, run_tag: str = "",
                 local_senders: set[int] | None = None, send_timeout_s: float = 10.0) -> None:
        self.rec = rec
        self.workload = workload
        self.point = point
        self.run_tag = run_tag
        self.local_senders = local_senders
        self.send_timeout_s = send_timeout_s
        self.in_flight = 0          # started sends not answered nor timed out
        self.next_m = 0             # the next message of the schedule to consider
        self._times = rec.schedule.times
        self._senders = rec.schedule.senders
        self._deadlines: deque[tuple[float, int]] = deque()   # (deadline, m), in send order
        self._waiting: set[int] = set()                       # started sends still unanswered

    @property
    def next_due(self) -> float | None:
        """When the next message of the schedule is due (monotonic), None after the last."""
        m = self.next_m
        return self.rec.start_at + self._times[m] if m < len(self._times) else None

    def take_due(self, now: float) -> list[tuple[int, int]]:
        """(m, sender) of every send due by `now` that this process drives and may start; a due
        send beyond `max_in_flight` is recorded as not sent. The caller starts each one (counted
        in flight from here on)."""
        out = []
        n, start_at, times = len(self._times), self.rec.start_at, self._times
        m = self.next_m
        while m < n and start_at + times[m] <= now:
            sender = self._senders[m]
            if self.local_senders is None or sender in self.local_senders:
                if self.in_flight >= self.workload.max_in_flight:
                    self.rec.on_skip(m)
                else:
                    self.in_flight += 1
                    out.append((m, sender))
            m += 1
        self.next_m = m
        return out

    def body(self, m: int) -> str:
        return message_body(self.point, m, self.workload.body_bytes)

    def txn(self, m: int) -> str:
        return f"{self.run_tag}p{self.point}m{m}"

    def start(self, m: int, now: float) -> None:
        """Send m starts now (taken from take_due): recorded, and timed out unless answered."""
        self.rec.on_send(m, now)
        self._waiting.add(m)
        self._deadlines.append((now + self.send_timeout_s, m))

    def answered(self, m: int, error: BaseException | None, now: float) -> None:
        if m not in self._waiting:
            return  # timed out already
        self._waiting.discard(m)
        self.in_flight -= 1
        if error is None:
            self.rec.on_ack(m, now)
        else:
            self.rec.on_ack(m, now, ok=False, error=error_kind(error))

    def expire(self, now: float) -> None:
        """Every started send unanswered `send_timeout_s` after it started fails as a timeout."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, m = deadlines.popleft()
            if m in self._waiting:
                self._waiting.discard(m)
                self.in_flight -= 1
                self.rec.on_ack(m, now, ok=False, error="timeout")

    def settled(self, m: int, error: BaseException | None, now: float) -> None:
        """The outcome of a send that timed itself out (a task per send): counted, no longer in
        flight."""
        self.in_flight -= 1
        if error is None:
            self.rec.on_ack(m, now)
        elif isinstance(error, TimeoutError):
            self.rec.on_ack(m, now, ok=False, error="timeout")
        else:
            self.rec.on_ack(m, now, ok=False, error=error_kind(error))


async def run_point(
    transport: Transport,
    plan: Plan,
    workload: Workload,
    point: int,
    *,
    run_tag: str = "",
    start_at: float | None = None,
    local_senders: set[int] | None = None,
    send_timeout_s: float = 10.0,
    window: WindowHook | None = None,
    fixed_drain: bool = False,
    schedule: Schedule | None = None,
) -> Recorder:
    """Runs one point and returns its Recorder. `window(t0, t1)` (e.g. resource sampling) runs
    alongside, given the monotonic start and end of the measured window. `local_senders` limits the
    senders this process drives (the GossipSub workers split them); `fixed_drain` waits the whole
    drain time (when owed deliveries are not all known locally)."""
    workload.validate()
    sched = schedule or make_schedule(workload)
    start_at = clock() + 0.2 if start_at is None else start_at
    rec = Recorder(plan, sched, point, start_at)
    transport.sink = lambda client, body, t: rec.on_body(client, body, t, parse_body)
    loop = OpenLoop(rec, workload, point, run_tag=run_tag, local_senders=local_senders,
                    send_timeout_s=send_timeout_s)
    window_done = anyio.Event()
    t_window = measured_window(workload, start_at)

    async def one(m: int, sender: int) -> None:
        rec.on_send(m, clock())
        error: BaseException | None = None
        try:
            with anyio.fail_after(send_timeout_s):
                await transport.send(sender, loop.body(m), loop.txn(m))
        except Exception as exc:  # a refused or broken send is a result, not a crash
            error = exc
        loop.settled(m, error, clock())

    fast = transport.send_nowait if getattr(transport, "can_send_nowait", False) else None  # type: ignore[attr-defined]

    def start_fast(m: int, sender: int) -> None:
        loop.start(m, clock())
        fast(sender, loop.body(m), loop.txn(m), lambda exc, m=m: loop.answered(m, exc, clock()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_window, window, t_window, window_done)
        while (due := loop.next_due) is not None:
            now = clock()
            loop.expire(now)
            if due > now:
                await anyio.sleep(due - now)
                continue
            for m, sender in loop.take_due(now):
                if fast is not None:
                    start_fast(m, sender)
                else:
                    tg.start_soon(one, m, sender)
        with anyio.move_on_after(send_timeout_s + 1):
            while loop.in_flight:
                await anyio.sleep(0.01)
                loop.expire(clock())
        deadline = clock() + workload.drain_s
        while clock() < deadline and (fixed_drain or rec.outstanding > 0):
            await anyio.sleep(0.02)
        with anyio.move_on_after(max(0.0, t_window[1] - clock()) + 5):
            await window_done.wait()
        tg.cancel_scope.cancel()
    transport.sink = None
    return rec


async def run_window(window: WindowHook | None, t_window: tuple[float, float], done) -> None:
    """Runs `window(t0, t1)` (resource sampling) over a point's measured window, if there is
    one; sets the event `done` however that ends."""
    try:
        if window is not None:
            await window(*t_window)
    finally:
        done.set()


def measured_window(workload: Workload, start_at: float) -> tuple[float, float]:
    """The monotonic start and end of a point's measured window (after the warm-up)."""
    return start_at + workload.warmup_s, start_at + workload.warmup_s + workload.duration_s
