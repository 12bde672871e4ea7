"""Direct push (node/adapters/p2p.py) with real py-libp2p hosts on 127.0.0.1: a node's frames go
to each peer on one long-lived stream when every connected peer has one, over GossipSub otherwise;
a frame that comes both ways is handed over once; a peer that is not admitted, or sends records
that break the framing, is refused and struck."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux

from sms.node.adapters import p2p
from sms.node.errors import PeerError
from tests.services_pg import free_port

SECRET = "5e" * 32
ROOM = p2p.BUNDLE_ROOM


class Peer:
    """One P2PNode and what it was handed. Fast lanes are off unless asked for: these tests are
    about the direct stream itself (tests/integration/test_p2p_lane.py: the lanes)."""

    def __init__(self, **options) -> None:
        options.setdefault("lanes", False)
        self.got: list[tuple[str, bytes, str]] = []
        self.admitted: set[str] | None = None  # None: everyone
        self.reject: set[bytes] = set()        # frames its validator calls malformed
        self.node = p2p.P2PNode(
            key_pair=create_new_key_pair(),
            listen_port=free_port(),
            secret=SECRET,
            on_frame=lambda room, data, author: self.got.append((room, data, author)),
            validator=self._validate,
            admission=lambda peer: self.admitted is None or peer in self.admitted,
            **options,
        )

    def _validate(self, room_id: str, data: bytes, author: str) -> bool:
        if data in self.reject:
            raise PeerError("malformed frame")
        return True

    @property
    def id(self) -> str:
        return self.node.peer_id

    def frames(self) -> list[bytes]:
        return [data for _room, data, _author in self.got]


async def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def connected(a: Peer, b: Peer) -> bool:
    return ID.from_base58(b.id) in a.node.host.get_connected_peers()


@asynccontextmanager
async def mesh(*peers: Peer, links: bool = True, pairs: list[tuple[Peer, Peer]] | None = None):
    """Starts the peers, connects every pair (or only `pairs`), joins the bundle topic, and waits
    for the GossipSub mesh (and, if `links`, every direct stream) to form."""
    pairs = pairs if pairs is not None else [(a, b) for a in peers for b in peers if a is not b]
    async with trio.open_nursery() as nursery:
        for peer in peers:
            await nursery.start(peer.node.serve)
        for a, b in pairs:
            if not connected(a, b):
                await a.node._dial(b.node.multiaddrs[0])
        for peer in peers:
            await peer.node.join_room(ROOM)
        neighbours = {p.id: sum(1 for q in peers if q is not p and connected(p, q)) for p in peers}
        await wait_for(lambda: all(len(p.node.mesh_peers(ROOM)) == neighbours[p.id] for p in peers),
                       what="the GossipSub mesh")
        if links:
            for peer in peers:
                peer.node._direct_peers()  # asks for the streams
            await wait_for(lambda: all(len(p.node._links) == neighbours[p.id] for p in peers),
                           what="the direct streams")
        yield nursery
        nursery.cancel_scope.cancel()


async def test_frames_go_on_direct_streams_and_each_peer_gets_each_once():
    alice, bob, carol = Peer(), Peer(), Peer()
    async with mesh(alice, bob, carol):
        sent = [b"frame %d " % i + b"x" * 2000 for i in range(50)]
        for data in sent:
            assert await alice.node.publish(ROOM, data) is True  # written to every peer's stream
        await wait_for(lambda: len(bob.got) == 50 and len(carol.got) == 50, what="50 frames each")
        await trio.sleep(0.3)  # nothing more comes: no forwarded copies
    for peer in (bob, carol):
        assert peer.frames() == sent  # one stream: in order
        assert {author for _room, _data, author in peer.got} == {alice.id}
        assert peer.node.stats.direct_frames_in == 50 and peer.node.stats.duplicate_frames == 0
    assert alice.node.stats.direct_frames_out == 50 and alice.node.stats.direct_fallbacks == 0
    assert alice.node.stats.frames_published == 50


async def test_a_direct_stream_grants_window_credit_in_batches_and_carries_frames_over_the_window(monkeypatch):
    # py-libp2p's yamux answers each read with a WINDOW_UPDATE; the receiver of a direct stream
    # grants credit only every p2p._CREDIT_BATCH_BYTES instead (a frame bigger than the whole
    # window must still get through).
    grants: list[int] = []
    credit_in_batches = p2p._credit_in_batches

    def counting_grants(stream) -> None:  # the receiver's end of each direct stream
        credit_in_batches(stream)
        muxed = stream.muxed_stream
        send_window_update = muxed.send_window_update

        async def counted(increment: int, skip_lock: bool = False) -> None:
            grants.append(increment)
            await send_window_update(increment, skip_lock)

        muxed.send_window_update = counted

    monkeypatch.setattr(p2p, "_credit_in_batches", counting_grants)
    alice, bob = Peer(), Peer()
    async with mesh(alice, bob):
        sent = [b"frame %d " % i + b"x" * 1000 for i in range(400)]
        sent.insert(200, b"big " + bytes(range(256)) * (3 * yamux.DEFAULT_WINDOW_SIZE // 256))
        for data in sent:
            await alice.node.publish(ROOM, data)
        await wait_for(lambda: len(bob.got) == len(sent), what="every frame")
    assert bob.frames() == sent
    read = sum(len(d) + 6 + len(ROOM) for d in sent)  # each record: size, room id, frame
    assert read - p2p._CREDIT_BATCH_BYTES < sum(grants) <= read  # all but the last batch granted
    assert len(grants) <= read // p2p._CREDIT_BATCH_BYTES, grants  # not one per read


async def test_a_peer_without_direct_streams_gets_the_frames_over_gossipsub():
    alice, bob, carol = Peer(), Peer(), Peer()
    carol.node.host.remove_stream_handler(p2p.DIRECT_PROTOCOL)  # say, an older node
    async with mesh(alice, bob, carol, links=False):
        alice.node._direct_peers()
        await wait_for(lambda: alice.node.stats.direct_link_failures >= 1 and bob.id in alice.node._links,
                       what="alice's streams tried")
        for i in range(10):
            assert await alice.node.publish(ROOM, b"gossiped %d" % i) is False  # in GossipSub's queues
        await wait_for(lambda: len(bob.got) == 10 and len(carol.got) == 10, what="10 frames each")
        await trio.sleep(0.3)
    assert alice.node.stats.direct_frames_out == 0 and alice.node.stats.direct_fallbacks >= 10
    assert sorted(bob.frames()) == sorted(carol.frames()) == sorted(b"gossiped %d" % i for i in range(10))
    assert bob.node.stats.direct_frames_in == 0


async def test_a_node_alone_publishes_nothing_and_says_no_peer_got_the_frame():
    alone = Peer()
    async with mesh(alone, links=False):
        assert await alone.node.publish(ROOM, b"for no one") is False
    assert alone.node.stats.frames_published == 0


async def test_a_frame_that_comes_both_ways_is_handed_over_once():
    alice, bob = Peer(), Peer()
    async with mesh(alice, bob):
        await alice.node.publish(ROOM, b"twice")  # directly
        await alice.node.pubsub.publish(p2p.room_topic(ROOM), b"twice")  # and over GossipSub
        await alice.node.publish(ROOM, b"after")
        await wait_for(lambda: bob.node.stats.duplicate_frames == 1, what="the copy")
    assert bob.frames() == [b"twice", b"after"]


async def test_a_broken_stream_sends_that_frame_over_gossipsub_and_is_opened_again():
    alice, bob = Peer(), Peer()
    async with mesh(alice, bob):
        await alice.node._links[bob.id].reset()
        await alice.node.publish(ROOM, b"while broken")
        assert alice.node.stats.direct_link_failures == 1 and alice.node.stats.direct_fallbacks == 1
        await wait_for(lambda: bob.frames() == [b"while broken"], what="the frame over GossipSub")
        # the next frames ask for a new stream, and use it once it is open
        await wait_for(lambda: alice.node._direct_peers() is not None, what="a new stream")
        await alice.node.publish(ROOM, b"direct again")
        await wait_for(lambda: len(bob.got) == 2, what="the second frame")
    assert bob.frames() == [b"while broken", b"direct again"]
    assert bob.node.stats.direct_frames_in == 1 and alice.node.stats.direct_frames_out == 1


async def test_frames_from_a_peer_no_longer_admitted_are_dropped_and_its_new_streams_refused():
    alice, bob = Peer(), Peer()
    async with mesh(alice, bob):
        bob.admitted = {bob.id}  # alice's registration lapsed
        await alice.node.publish(ROOM, b"not for bob")
        await wait_for(lambda: bob.node.stats.direct_dropped == 1, what="the drop")
        # a stream alice opens now is refused before any frame is read
        await alice.node._drop_link(bob.id)
        failures = alice.node.stats.direct_link_failures
        await alice.node._open_link(bob.id)
        assert bob.id not in alice.node._links
        assert alice.node.stats.direct_link_failures == failures + 1
        assert bob.node.stats.direct_refused == 1
    assert bob.got == []


async def test_a_malformed_frame_strikes_its_sender_and_a_broken_record_ends_its_stream():
    alice, bob = Peer(), Peer()
    async with mesh(alice, bob):
        bob.reject.add(b"garbage")
        await alice.node.publish(ROOM, b"garbage")
        await wait_for(lambda: bob.node.stats.strikes == 1, what="the first strike")
        assert bob.node.stats.frames_rejected == 1 and bob.got == []
        stream = await alice.node.host.new_stream(ID.from_base58(bob.id), [p2p.DIRECT_PROTOCOL])
        assert await p2p._read_exact(stream, 1) == p2p._DIRECT_ACCEPT
        await stream.write((p2p.MAX_DIRECT_FRAME_BYTES + 1).to_bytes(4, "big"))
        await wait_for(lambda: bob.node.stats.strikes == 2, what="the second strike")
        stream = await alice.node.host.new_stream(ID.from_base58(bob.id), [p2p.DIRECT_PROTOCOL])
        assert await p2p._read_exact(stream, 1) == p2p._DIRECT_ACCEPT
        await stream.write((10).to_bytes(4, "big") + (200).to_bytes(2, "big") + b"x" * 8)
        await wait_for(lambda: bob.node.stats.cut_offs == 1, what="the third strike, and the cut-off")
        assert bob.node.stats.strikes == 3
        await _reset(stream)
    assert bob.got == []


async def test_a_node_reached_only_through_another_gets_the_frames_relayed_over_gossipsub():
    # alice and carol joined through bob and have not met yet (the DHT introduces them later)
    alice, bob, carol = (Peer(cluster_size=lambda: 3) for _ in range(3))
    async with mesh(alice, bob, carol, pairs=[(alice, bob), (carol, bob)]):
        assert not connected(alice, carol)
        for i in range(5):
            await alice.node.publish(ROOM, b"via bob %d" % i)
        await wait_for(lambda: len(carol.got) == 5 and len(bob.got) == 5, what="5 frames each")
        assert alice.node.stats.direct_frames_out == 0 and alice.node.stats.direct_fallbacks >= 5
        # once they meet, frames go directly
        await alice.node._dial(carol.node.multiaddrs[0])
        await wait_for(lambda: alice.node._direct_peers() is not None, what="alice's streams")
        await alice.node.publish(ROOM, b"direct")
        await wait_for(lambda: len(carol.got) == 6 and len(bob.got) == 6, what="the direct frame")
    assert alice.node.stats.direct_frames_out == 1
    assert sorted(carol.frames()) == sorted(bob.frames()) == sorted([b"via bob %d" % i for i in range(5)] + [b"direct"])


async def test_a_starting_node_accepts_direct_streams_only_once_it_is_on_its_topics():
    alice, bob = Peer(), Peer(rooms_at_start=(ROOM,))
    on_topics = trio.Event()
    join = bob.node.join_room

    async def slow_join(room_id: str) -> None:  # bob is slow to subscribe while it starts
        await on_topics.wait()
        await join(room_id)

    bob.node.join_room = slow_join
    async with trio.open_nursery() as nursery:
        await nursery.start(alice.node.serve)
        nursery.start_soon(bob.node.serve)
        await wait_for(lambda: bool(bob.node.host.get_addrs()), what="bob listening")
        await alice.node._dial(bob.node.multiaddrs[0])  # alice asks for a direct stream at once
        await trio.sleep(0.5)
        assert bob.id not in alice.node._links  # not accepted: bob would drop what it got
        on_topics.set()
        await wait_for(lambda: bob.id in alice.node._links, what="the stream accepted")
        await alice.node.join_room(ROOM)
        await alice.node.publish(ROOM, b"first")
        await wait_for(lambda: bob.frames() == [b"first"], what="the frame")
        nursery.cancel_scope.cancel()
    assert bob.node.stats.direct_frames_in == 1 and bob.node.stats.direct_dropped == 0


async def test_a_cluster_over_the_limit_publishes_over_gossipsub_only():
    alice, bob = Peer(direct_max_peers=1), Peer(direct_max_peers=1)
    carol = Peer(direct_max_peers=1)
    async with mesh(alice, bob, carol, links=False):
        await alice.node.publish(ROOM, b"gossip")
        await wait_for(lambda: bob.frames() == carol.frames() == [b"gossip"], what="the frame")
    assert alice.node._direct_peers() is None
    assert alice.node.stats.direct_frames_out == 0 and alice.node.stats.direct_fallbacks == 0


async def _reset(stream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
