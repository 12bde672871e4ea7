"""The raw py-libp2p GossipSub baseline: H host processes (default 3) and nothing of sms on top: no
gateway, no validators, no database, no CRDT log. Configured like node/adapters/p2p.py: Noise, one
connection per peer, GossipSub /meshsub/1.1.0 only, spam protection, adaptive gossip and eclipse
protection off, strict signing.

There are no separate clients: each host process runs its share of the senders with the same load
engine and Recorder as sms and NATS (benchmarks/engine.py), publishing at the scheduled times, and
records what its subscriptions deliver. So the generator's CPU is inside these processes. Each host
subscribes to every room; a message's recipients are the other hosts. Timestamps come from
CLOCK_MONOTONIC, which all processes on the machine share.

The coordinator (`GossipCluster`) talks to each worker over its stdin/stdout, one JSON line each way:
    worker -> READY {"peer_id"}                          once meshed in every room's topic
    coord  -> POINT {"workload", "point", "start_at"}    worker -> RESULT {recorder export}
    coord  -> QUIT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Callable

import trio

from .engine import clock, run_point
from .recorder import Recorder
from .schedule import Workload, host_plan, make_schedule

TOPIC = "bench/v1/room/"


def _seed(index: int, run: str) -> bytes:
    import hashlib

    return hashlib.sha256(f"{run}/{index}".encode()).digest()


def peer_id_for(index: int, run: str) -> str:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(create_new_key_pair(_seed(index, run)).public_key))


class _HostTransport:
    def __init__(self, pubsub, rooms: int, plan) -> None:
        self.pubsub = pubsub
        self.plan = plan
        self.topics = [TOPIC + str(k) for k in range(rooms)]
        self.sink = None
        self.frames = 0

    async def send(self, sender: int, body: str, txn: str) -> None:
        await self.pubsub.publish(self.topics[self.plan.senders[sender][1]], body.encode())


async def _worker(index: int, hosts: int, rooms: int, ports: list[int], run: str) -> None:
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.tools.anyio_service import background_trio_service

    key_pair = create_new_key_pair(_seed(index, run))
    listen = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{ports[index]}")
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL: NoiseTransport(key_pair, create_noise_key_pair().private_key)},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=[listen],
    )
    gossipsub = GossipSub(
        [PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
        heartbeat_initial_delay=0.1, adaptive_gossip_enabled=False, spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    me = host.get_id().to_bytes()
    stdin = trio.wrap_file(sys.stdin)

    def emit(kind: str, payload: dict) -> None:
        sys.stdout.write(kind + " " + json.dumps(payload) + "\n")
        sys.stdout.flush()

    async with host.run([listen]), background_trio_service(pubsub), background_trio_service(gossipsub):
        await pubsub.wait_until_ready()
        plan = None
        transport = None
        async with trio.open_nursery() as nursery:
            subs = [await pubsub.subscribe(TOPIC + str(k)) for k in range(rooms)]

            async def read(sub) -> None:
                while True:
                    msg = await sub.get()
                    t = clock()
                    if msg.from_id == me or transport is None:
                        continue
                    transport.frames += 1
                    if transport.sink is not None:
                        transport.sink(index, msg.data.decode(), t)

            for sub in subs:
                nursery.start_soon(read, sub)
            with trio.fail_after(60):
                for j in range(index):
                    addr = f"/ip4/127.0.0.1/tcp/{ports[j]}/p2p/{peer_id_for(j, run)}"
                    while True:
                        try:
                            with trio.fail_after(5):
                                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                            break
                        except Exception:  # noqa: BLE001 - the peer may not listen yet
                            await trio.sleep(0.2)
                while any(len(gossipsub.mesh.get(TOPIC + str(k), ())) < hosts - 1 for k in range(rooms)):
                    await trio.sleep(0.1)
            emit("READY", {"peer_id": str(host.get_id())})
            while True:
                line = await stdin.readline()
                if not line or line.startswith("QUIT"):
                    break
                kind, _, rest = line.partition(" ")
                if kind != "POINT":
                    continue
                cmd = json.loads(rest)
                workload = Workload(**cmd["workload"])
                plan = host_plan(workload, hosts)
                transport = _HostTransport(pubsub, rooms, plan)
                mine = {s for s, (c, _) in enumerate(plan.senders) if c == index}
                rec = await run_point(transport, plan, workload, cmd["point"], start_at=cmd["start_at"],
                                      local_senders=mine, fixed_drain=True)
                emit("RESULT", rec.export())
            nursery.cancel_scope.cancel()


class GossipCluster:
    """H worker processes we start and stop by PID."""

    def __init__(self, hosts: int, rooms: int, say: Callable[[str], None] = print) -> None:
        from .cluster import free_port_block

        self.hosts, self.rooms, self.say = hosts, rooms, say
        base = free_port_block(hosts)
        self.ports = [base + i for i in range(hosts)]
        self.run = os.urandom(4).hex()
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout_s: float = 90) -> None:
        for i in range(self.hosts):
            cmd = [sys.executable, "-m", "sms.benchmarks.gossip", str(i), str(self.hosts), str(self.rooms),
                   ",".join(map(str, self.ports)), self.run]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
        deadline = time.monotonic() + timeout_s
        for i, p in enumerate(self.procs):
            line = self._readline(p, deadline)
            if not line.startswith("READY"):
                raise RuntimeError(f"gossip worker {i} did not get ready: {line!r}")
        self.say(f"  {self.hosts} GossipSub hosts meshed in every topic (pids {[p.pid for p in self.procs]})")

    def _readline(self, p: subprocess.Popen, deadline: float) -> str:
        import select

        assert p.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("gossip worker did not answer in time")
            r, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
            if r:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"gossip worker exited with {p.wait()}")
                if line.startswith(("READY", "RESULT")):
                    return line
            elif p.poll() is not None:
                raise RuntimeError(f"gossip worker exited with {p.returncode}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def run_point(self, workload: Workload, point: int, window=None) -> Recorder:
        start_at = clock() + 1.0
        cmd = json.dumps({"workload": asdict(workload), "point": point, "start_at": start_at})
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("POINT " + cmd + "\n")
            p.stdin.flush()
        plan = host_plan(workload, self.hosts)
        rec = Recorder(plan, make_schedule(workload), point, start_at)
        total = workload.warmup_s + workload.duration_s + workload.drain_s + 30
        async with trio.open_nursery() as nursery:
            if window is not None:
                nursery.start_soon(window, start_at + workload.warmup_s, start_at + workload.warmup_s + workload.duration_s)
            deadline = time.monotonic() + total + 1
            for p in self.procs:
                line = await trio.to_thread.run_sync(self._readline, p, deadline)
                rec.merge(json.loads(line.partition(" ")[2]))
        return rec

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    assert p.stdin is not None
                    p.stdin.write("QUIT\n")
                    p.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def main() -> None:
    import logging

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    index, hosts, rooms, ports, run = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    trio.run(_worker, index, hosts, rooms, [int(p) for p in ports.split(",")], run)


if __name__ == "__main__":
    main()
