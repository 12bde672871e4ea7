"""CPU per direct frame: two sms P2P hosts (node/adapters/p2p.py) in one process on 127.0.0.1,
one pushing F frames of B bytes to the other at R frames/s, on its fast lane (lane.py: plain TCP,
ChaCha20-Poly1305) or, with --no-lanes, on its direct stream (Noise, the private-network cipher,
yamux). Reports the process's CPU per frame (both ends together) and what the same loop costs
with nothing sent, so the difference is the frame's own cost.

    .venv/bin/python -m sms.benchmarks.frame_cost --frames 3000 --rate 1000 --bytes 2000
    .venv/bin/python -m sms.benchmarks.frame_cost --no-lanes          # as before the fast lane
    .venv/bin/python -m sms.benchmarks.frame_cost --no-lanes --per-read-credit   # as before 9a71093

`--per-read-credit` measures the direct stream as it was before the receiver batched its window
credit: py-libp2p's own credit rule (a WINDOW_UPDATE for every read) and two reads per record.
Bounded: F frames, then at most 30 s for the last to arrive.
"""

from __future__ import annotations

import argparse
import os
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from sms.node.adapters import p2p

from .cluster import free_port

SECRET = "5e" * 32


def _host(got: list[bytes] | None = None, lanes: bool = True) -> p2p.P2PNode:
    return p2p.P2PNode(
        key_pair=create_new_key_pair(), listen_port=free_port(), secret=SECRET, lanes=lanes,
        on_frame=(lambda room, data, author: got.append(data)) if got is not None else None,
        rooms_at_start=(p2p.BUNDLE_ROOM,),  # a receiver drops frames of topics it is not on
    )


async def _until(condition, timeout_s: float, what: str) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)
        return
    raise RuntimeError(f"timed out waiting for {what}")


async def _paced(count: int, rate: float, each) -> None:
    start = trio.current_time()
    for i in range(count):
        await each(i)
        await trio.sleep_until(start + (i + 1) / rate)


class _TwoReadsPerRecord(p2p._RecordReader):
    """Each record read as its length, then its body (the reader before 9a71093)."""

    async def next(self, max_bytes: int) -> bytes:
        size = int.from_bytes(await p2p._read_exact(self._stream, 4), "big")
        if not 2 <= size <= max_bytes:
            raise p2p.PeerError(f"direct frame of {size} bytes is out of bounds")
        return await p2p._read_exact(self._stream, size)


async def measure(frames: int, rate: float, size: int, per_read_credit: bool = False,
                  lanes: bool = True) -> dict:
    credit, reader = p2p._credit_in_batches, p2p._RecordReader
    if per_read_credit:
        p2p._credit_in_batches, p2p._RecordReader = (lambda stream: None), _TwoReadsPerRecord
    try:
        return await _measure(frames, rate, size, per_read_credit, lanes)
    finally:
        p2p._credit_in_batches, p2p._RecordReader = credit, reader


async def _measure(frames: int, rate: float, size: int, per_read_credit: bool, lanes: bool) -> dict:
    got: list[bytes] = []
    sender, receiver = _host(lanes=lanes), _host(got, lanes=lanes)
    async with trio.open_nursery() as nursery:
        for host in (sender, receiver):
            await nursery.start(host.serve)
        await sender._dial(receiver.multiaddrs[0])
        await _until(lambda: sender._direct_peers() is not None, 10, "the direct stream")
        if lanes:
            await _until(lambda: sender.stats.lanes_opened > 0, 10, "the fast lane")
        payload = os.urandom(size)

        async def push(i: int) -> None:
            await sender.publish(p2p.BUNDLE_ROOM, i.to_bytes(4, "big") + payload)

        async def nothing(i: int) -> None:
            pass

        c0 = time.process_time()
        await _paced(frames, rate, nothing)
        idle = (time.process_time() - c0) / frames
        c0 = time.process_time()
        await _paced(frames, rate, push)
        await _until(lambda: len(got) >= frames, 30, f"{frames} frames")
        busy = (time.process_time() - c0) / frames
        nursery.cancel_scope.cancel()
    assert [int.from_bytes(d[:4], "big") for d in got] == list(range(frames)), "frames out of order"
    return {"frames": frames, "rate": rate, "bytes": size, "per_read_credit": per_read_credit,
            "lanes": lanes, "cpu_ms_per_frame": busy * 1e3,
            "loop_cpu_ms_per_iteration": idle * 1e3, "frame_cpu_ms": (busy - idle) * 1e3,
            "direct_frames": sender.stats.direct_frames_out, "lane_frames": sender.stats.lane_frames_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=1000.0, help="frames per second")
    parser.add_argument("--bytes", type=int, default=2000, help="frame size")
    parser.add_argument("--per-read-credit", action="store_true",
                        help="py-libp2p's window credit after every read, two reads a record (as before)")
    parser.add_argument("--no-lanes", action="store_true",
                        help="frames on the libp2p direct stream, not the fast lane (as before)")
    args = parser.parse_args()
    if not (1 <= args.frames <= 100_000 and 1 <= args.rate <= 100_000 and 1 <= args.bytes <= 1_000_000):
        parser.error("--frames 1..100000, --rate 1..100000, --bytes 1..1000000")
    r = trio.run(measure, args.frames, args.rate, args.bytes, args.per_read_credit, not args.no_lanes)
    how = ("fast lane" if r["lanes"] else
           "direct stream, " + ("per-read credit, two reads a record" if r["per_read_credit"] else "credit in batches"))
    print(f"{how}: {r['frames']} frames of {r['bytes']} B at {r['rate']:g}/s: {r['cpu_ms_per_frame']:.3f} ms of CPU "
          f"per frame, both ends ({r['loop_cpu_ms_per_iteration']:.3f} of it the loop's own: "
          f"{r['frame_cpu_ms']:.3f} ms the frame's); {r['lane_frames']} of {r['direct_frames']} on the lane")


if __name__ == "__main__":
    main()
