"""Issue 8: only the cluster's own nodes join the mesh. Rogue peers here are real libp2p hosts
(our own adapter, so they speak exactly our protocols) on 127.0.0.1, against a real cluster."""

from __future__ import annotations

import json
import os
import secrets
import socket

import httpx
import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from trio_websocket import open_websocket_url

from sms.node.adapters.etcd import EtcdRegistry
from sms.node.adapters.p2p import BUNDLE_ROOM, P2PNode
from sms.node.core.envelope import encode_bundle, encode_frame
from sms.node.core.model import Message, message_id_for

from .harness import ClusterProcess
from .test_message_plane import setup_room

pytestmark = pytest.mark.slow



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rogue:
    """A libp2p peer that is not an sms node: it counts every room frame that reaches it."""

    def __init__(self, cluster: ClusterProcess, secret: str | None) -> None:
        self.frames: list[bytes] = []
        self.node = P2PNode(
            key_pair=create_new_key_pair(os.urandom(32)),
            listen_port=free_port(),
            secret=secret,
            bootstrap=(cluster.info["nodes"][0]["multiaddrs"][0],),
            on_frame=lambda room, data, author: self.frames.append(data),
        )

    async def join(self, room: str) -> None:
        """Room traffic all rides the bundle topic (the room argument documents intent)."""
        await self.node.join_room(BUNDLE_ROOM)

    async def publish(self, frame: bytes) -> None:
        """A room frame inside a bundle, as nodes send it."""
        await self.node.publish(BUNDLE_ROOM, encode_bundle(self.node.peer_id, [frame]))


async def message_bodies(ws, seconds: float) -> list[str]:
    """The bodies of every message event a WebSocket receives within `seconds`."""
    bodies = []
    with trio.move_on_after(seconds):
        while True:
            event = json.loads(await ws.get_message())
            if event["type"] == "message":
                bodies.append(event["body"])
    return bodies


async def status(cluster: ClusterProcess, i: int) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(cluster.http(i) + "/v1/status")).json()


async def frames_rejected(cluster: ClusterProcess) -> float:
    """Frames the nodes' validators refused, summed over the cluster (the nodes' own counter: a
    bundle whose frames fail their checks is still forwarded, so the GossipSub layer does not see it)."""
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(3):
            for line in (await http.get(cluster.http(i) + "/metrics")).text.splitlines():
                if line.startswith("sms_frames_rejected_total "):
                    total += float(line.split()[1])
    return total


def cluster_secret(cluster: ClusterProcess) -> str:
    return (cluster.data_dir / "cluster.secret").read_text().strip()


async def test_a_peer_without_the_cluster_key_cannot_connect(cluster: ClusterProcess) -> None:
    rogue = Rogue(cluster, secret=secrets.token_hex(32))
    async with trio.open_nursery() as nursery:
        await nursery.start(rogue.node.serve)
        with trio.fail_after(20):  # its discovery loop keeps dialling the bootstrap node
            while rogue.node.stats.dial_failures < 2:
                await trio.sleep(0.1)
        assert rogue.node.connected_peers == []
        assert not rogue.node.joined
        nursery.cancel_scope.cancel()
    for i in range(3):
        assert rogue.node.peer_id not in (await status(cluster, i))["connected_peers"]


async def test_an_unregistered_peer_with_the_key_gets_nothing_and_injects_nothing(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        rogue = Rogue(cluster, secret=cluster_secret(cluster))
        async with trio.open_nursery() as nursery:
            await nursery.start(rogue.node.serve)
            await rogue.join(room)
            async with open_websocket_url(cluster.ws(1) + f"/v1/events?token={users[1][1]}") as ws:
                await trio.sleep(2)
                # It forges a message from a real member and publishes it on the room's topic.
                forged = Message(message_id_for(room, users[0][0], "forged"), room, users[0][0], "forged!", 1, "forged",
                                 rogue.node.peer_id, 1, 1)
                await rogue.publish(encode_frame(room, rogue.node.peer_id, [forged]))
                # Its sync requests are refused.
                reply = await rogue.node.sync_request(cluster.info["nodes"][0]["peer_id"], msgpack.packb([1, {room: {}}]))
                assert reply is None
                # Real traffic flows in the room; none of it reaches the rogue, and the forgery reaches no client.
                r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/real", json={"body": "real"},
                                   headers={"Authorization": f"Bearer {users[0][1]}"})
                assert r.status_code == 200
                bodies = await message_bodies(ws, 3)
            assert bodies == ["real"]
            assert rogue.frames == []
            nursery.cancel_scope.cancel()
        refused = sum([(await status(cluster, i))["p2p"]["refused_connections"] for i in range(3)])
        assert refused >= 1
        for i in range(3):
            assert rogue.node.peer_id not in (await status(cluster, i))["connected_peers"]


async def test_a_removed_node_stops_receiving_room_traffic_within_a_second(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        hdr = {"Authorization": f"Bearer {users[0][1]}"}
        rogue = Rogue(cluster, secret=cluster_secret(cluster))
        registry = await EtcdRegistry.connect(cluster.info["etcd"])
        try:
            await registry.register_node(rogue.node.peer_id, {"name": "extra"}, 30)
            async with trio.open_nursery() as nursery:
                await nursery.start(rogue.node.serve)
                await rogue.join(room)
                # Admitted, it is part of the room's mesh and receives its frames.
                with trio.fail_after(20):
                    i = 0
                    while not rogue.frames:
                        await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/before-{i}", json={"body": "x"}, headers=hdr)
                        i += 1
                        await trio.sleep(0.3)
                await registry.remove_node(rogue.node.peer_id)
                await trio.sleep(1.0)
                seen = len(rogue.frames)
                for j in range(10):
                    r = await http.put(cluster.http(j % 3) + f"/v1/rooms/{room}/messages/after-{j}", json={"body": "y"}, headers=hdr)
                    assert r.status_code == 200
                await trio.sleep(2)
                assert len(rogue.frames) == seen
                nursery.cancel_scope.cancel()
        finally:
            await registry.close()
        for i in range(3):
            with trio.fail_after(10):  # the rogue's last redial is refused and dropped
                while rogue.node.peer_id in (await status(cluster, i))["connected_peers"]:
                    await trio.sleep(0.1)


async def test_fuzzed_frames_from_an_admitted_peer_are_rejected_and_penalised(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        rogue = Rogue(cluster, secret=cluster_secret(cluster))
        registry = await EtcdRegistry.connect(cluster.info["etcd"])
        try:
            await registry.register_node(rogue.node.peer_id, {"name": "fuzzer"}, 30)
            before = [(await status(cluster, i))["p2p"] for i in range(3)]
            async with trio.open_nursery() as nursery:
                await nursery.start(rogue.node.serve)
                await rogue.join(room)
                async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={users[2][1]}") as ws:
                    await trio.sleep(2)
                    good = encode_frame(room, rogue.node.peer_id, [
                        Message(message_id_for(room, users[0][0], "f"), room, users[0][0], "fuzz", 1, "f", rogue.node.peer_id, 1, 1)
                    ])
                    rng = __import__("random").Random(1234)
                    for k in range(40):
                        choice = k % 4
                        if choice == 0:
                            data = os.urandom(rng.randrange(0, 300))
                        elif choice == 1:
                            data = bytearray(good)
                            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                            data = bytes(data)
                        elif choice == 2:
                            data = good[: rng.randrange(len(good))]
                        else:
                            data = b"\x01" + os.urandom(64)
                        if k % 8 >= 4:
                            await rogue.node.publish(BUNDLE_ROOM, b"\x02" + data)  # a garbled bundle
                        else:
                            await rogue.publish(data)  # a garbled frame in a good bundle
                        await trio.sleep(0.02)
                    received = []
                    with trio.move_on_after(3):
                        while True:
                            event = json.loads(await ws.get_message())
                            if event["type"] == "message":
                                received.append(event)
                    assert received == []
                nursery.cancel_scope.cancel()
        finally:
            await registry.close()
        after = [(await status(cluster, i)) for i in range(3)]
        for i in range(3):
            assert (await http.get(cluster.http(i) + "/healthz")).status_code == 200
        rejected = sum(a["p2p"]["frames_rejected"] - b["frames_rejected"] for a, b in zip(after, before))
        print(f"\n[fuzz] frames rejected {rejected}; strikes {[a['p2p']['strikes'] for a in after]}; cut-offs {[a['p2p']['cut_offs'] for a in after]}")
        assert rejected >= 1
        # Penalised: cut off by at least one node, and scored below zero where it is still listed.
        assert sum(a["p2p"]["cut_offs"] - b["cut_offs"] for a, b in zip(after, before)) >= 1
        scores = [a["peer_scores"][rogue.node.peer_id] for a in after if rogue.node.peer_id in a["peer_scores"]]
        assert all(score < 0 for score in scores)


async def test_an_admitted_node_publishing_for_a_user_without_a_session_reaches_no_client(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        (_, alice), (bob_id, bob), (_, carol) = users
        # Bob is a member of the room but logs out: he has no session anywhere.
        assert (await http.delete(cluster.http(1) + "/v1/sessions/current", headers={"Authorization": f"Bearer {bob}"})).status_code == 204
        rogue = Rogue(cluster, secret=cluster_secret(cluster))
        registry = await EtcdRegistry.connect(cluster.info["etcd"])
        try:
            await registry.register_node(rogue.node.peer_id, {"name": "impostor"}, 30)
            rejected_before = await frames_rejected(cluster)
            async with trio.open_nursery() as nursery:
                await nursery.start(rogue.node.serve)
                await rogue.join(room)
                async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={carol}") as ws:
                    await trio.sleep(2)
                    forged = Message(message_id_for(room, bob_id, "ghost"), room, bob_id, "a ghost writes", 1 << 16,
                                     "ghost", rogue.node.peer_id, 1, 1)
                    await rogue.publish(encode_frame(room, rogue.node.peer_id, [forged]))
                    r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/real", json={"body": "real"},
                                       headers={"Authorization": f"Bearer {alice}"})
                    assert r.status_code == 200
                    bodies = await message_bodies(ws, 3)
                    assert bodies == ["real"]
                nursery.cancel_scope.cancel()
        finally:
            await registry.close()
        history = (await http.get(cluster.http(0) + f"/v1/rooms/{room}/messages", headers={"Authorization": f"Bearer {alice}"})).json()
        assert [m["body"] for m in history["messages"]] == ["real"]
        # It was the validators that stopped it (the impostor was admitted, so the frame arrived).
        assert await frames_rejected(cluster) > rejected_before
