"""The open-loop engine (benchmarks/engine.py) against in-memory transports: the task-per-send
path and the send_nowait fast path must account for acks, refusals and timeouts alike."""

import time

import trio

from sms.benchmarks.engine import run_point
from sms.benchmarks.schedule import Workload, client_plan


class AwaitingTransport:
    """send() returns on ack; message m's fate is fate(m): "ack", "refuse" or "silent"."""

    def __init__(self, fate, deliver):
        self.sink = None
        self.fate, self.deliver = fate, deliver

    async def send(self, sender: int, body: str, txn: str) -> None:
        m = int(txn.rpartition("m")[2])
        kind = self.fate(m)
        if kind == "silent":
            await trio.sleep_forever()
        if kind == "refuse":
            raise PermissionError("refused")
        self.deliver(self, sender, body)


class NowaitTransport:
    """The fast path: answers arrive later from another task, like acks read off a socket."""

    can_send_nowait = True

    def __init__(self, fate, deliver, nursery):
        self.sink = None
        self.fate, self.deliver, self.nursery = fate, deliver, nursery

    async def send(self, sender, body, txn):  # pragma: no cover - the engine must not use it
        raise AssertionError("the engine should use send_nowait")

    def send_nowait(self, sender, body, txn, done):
        m = int(txn.rpartition("m")[2])
        kind = self.fate(m)
        if kind == "silent":
            return
        if kind == "refuse" and m % 2:
            done(PermissionError("refused"))  # answered before returning
            return

        async def later():
            await trio.sleep(0.005)
            if kind == "refuse":
                done(PermissionError("refused"))
            else:
                self.deliver(self, sender, body)
                done(None)

        self.nursery.start_soon(later)


def fate(m: int) -> str:
    return "silent" if m % 10 == 3 else "refuse" if m % 10 == 7 else "ack"


async def run(make_transport):
    w = Workload(clients=4, senders=2, rooms=1, rate=200, duration_s=0.5, warmup_s=0, drain_s=0.2)
    plan = client_plan(w, nodes=1)

    def deliver(transport, sender, body):
        for c in plan.recipients(sender):
            transport.sink(c, body, time.monotonic())  # the engine's clock

    async with trio.open_nursery() as nursery:
        transport = make_transport(deliver, nursery)
        rec = await run_point(transport, plan, w, point=1, send_timeout_s=0.3)
        nursery.cancel_scope.cancel()
    return rec.summary(duration_s=w.duration_s, cdf=0)


async def test_both_paths_count_acks_refusals_and_timeouts_alike():
    slow = await run(lambda deliver, nursery: AwaitingTransport(fate, deliver))
    fast = await run(lambda deliver, nursery: NowaitTransport(fate, deliver, nursery))
    for s in (slow, fast):
        assert s["sent"] == 100
        assert s["error_kinds"] == {"timeout": 10, "PermissionError": 10}
        assert s["send_errors"] == 20
        assert s["lost"] == 0 and s["duplicates"] == 0
        assert s["delivered"] == 80 * 3
