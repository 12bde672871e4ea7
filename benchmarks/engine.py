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
    in_flight = 0
    window_done = anyio.Event()
    t_window = (start_at + workload.warmup_s, start_at + workload.warmup_s + workload.duration_s)

    async def one(m: int, sender: int) -> None:
        nonlocal in_flight
        body = message_body(point, m, workload.body_bytes)
        rec.on_send(m, clock())
        try:
            with anyio.fail_after(send_timeout_s):
                await transport.send(sender, body, f"{run_tag}p{point}m{m}")
        except TimeoutError:
            rec.on_ack(m, clock(), ok=False, error="timeout")
        except Exception as exc:  # a refused or broken send is a result, not a crash
            rec.on_ack(m, clock(), ok=False, error=getattr(exc, "kind", None) or type(exc).__name__)
        else:
            rec.on_ack(m, clock())
        finally:
            in_flight -= 1

    fast = transport.send_nowait if getattr(transport, "can_send_nowait", False) else None  # type: ignore[attr-defined]
    deadlines: deque[tuple[float, int]] = deque()   # (deadline, m) of fast sends, in send order
    waiting: set[int] = set()                       # fast sends not answered nor timed out

    def answered(m: int, exc: Exception | None) -> None:
        nonlocal in_flight
        if m not in waiting:
            return  # timed out already
        waiting.discard(m)
        in_flight -= 1
        if exc is None:
            rec.on_ack(m, clock())
        else:
            rec.on_ack(m, clock(), ok=False, error=getattr(exc, "kind", None) or type(exc).__name__)

    def expire(now: float) -> None:
        nonlocal in_flight
        while deadlines and deadlines[0][0] <= now:
            _, m = deadlines.popleft()
            if m in waiting:
                waiting.discard(m)
                in_flight -= 1
                rec.on_ack(m, now, ok=False, error="timeout")

    def start_fast(m: int, sender: int) -> None:
        body = message_body(point, m, workload.body_bytes)
        now = clock()
        rec.on_send(m, now)
        waiting.add(m)
        deadlines.append((now + send_timeout_s, m))
        fast(sender, body, f"{run_tag}p{point}m{m}", lambda exc, m=m: answered(m, exc))

    async def run_window() -> None:
        try:
            if window is not None:
                await window(*t_window)
        finally:
            window_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_window)
        n = len(sched)
        m = 0
        while m < n:
            due = start_at + sched.times[m]
            now = clock()
            expire(now)
            if due > now:
                await anyio.sleep(due - now)
                continue
            while m < n and start_at + sched.times[m] <= now:
                sender = sched.senders[m]
                if local_senders is None or sender in local_senders:
                    if in_flight >= workload.max_in_flight:
                        rec.on_skip(m)
                    elif fast is not None:
                        in_flight += 1
                        start_fast(m, sender)
                    else:
                        in_flight += 1
                        tg.start_soon(one, m, sender)
                m += 1
        with anyio.move_on_after(send_timeout_s + 1):
            while in_flight:
                await anyio.sleep(0.01)
                expire(clock())
        deadline = clock() + workload.drain_s
        while clock() < deadline and (fixed_drain or rec.outstanding > 0):
            await anyio.sleep(0.02)
        with anyio.move_on_after(max(0.0, t_window[1] - clock()) + 5):
            await window_done.wait()
        tg.cancel_scope.cancel()
    transport.sink = None
    return rec
