"""Fast lanes (node/adapters/lane.py, wired in p2p.py) with real py-libp2p hosts on 127.0.0.1: once
a peer's lane is open a node's direct frames go on it, whole and in order; a lane that breaks
sends that frame over GossipSub and is opened again; a peer without lanes keeps the direct stream;
a lane is only for the peer it was offered to, once, and a record that fails authentication
strikes its sender."""

from __future__ import annotations

import os

import trio
from libp2p.peer.id import ID

from sms.node.adapters import lane, p2p
from tests.integration.test_p2p_direct import ROOM, Peer, mesh, wait_for


def lanes_open(*pairs: tuple[Peer, Peer]) -> bool:
    return all(b.id in a.node._lanes for a, b in pairs)


async def test_frames_go_on_the_lanes_once_open_whole_and_in_order():
    alice, bob, carol = Peer(lanes=True), Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob, carol):
        await wait_for(lambda: lanes_open((alice, bob), (alice, carol), (bob, alice)), what="the lanes")
        sent = [b"frame %d " % i + os.urandom(i * 7) for i in range(300)]
        sent.insert(150, b"big " + os.urandom(3 * 1024 * 1024))  # many socket writes and reads
        for data in sent:
            await alice.node.publish(ROOM, data)
        await wait_for(lambda: len(bob.got) == len(carol.got) == len(sent), what="every frame")
        await trio.sleep(0.2)
    for peer in (bob, carol):
        assert peer.frames() == sent
        assert {author for _room, _data, author in peer.got} == {alice.id}
        assert peer.node.stats.lane_frames_in == len(sent) and peer.node.stats.duplicate_frames == 0
    assert alice.node.stats.lane_frames_out == 2 * len(sent)
    assert alice.node.stats.direct_frames_out == len(sent) and alice.node.stats.direct_fallbacks == 0


async def test_a_broken_lane_sends_that_frame_over_gossipsub_and_is_opened_again():
    alice, bob = Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob):
        await wait_for(lambda: lanes_open((alice, bob)), what="the lane")
        for stream in list(bob.node._lanes_in[alice.id]):
            stream.socket.close()  # bob's end goes: alice's writes fail once the reset comes back
        sent, failed = [], None
        while failed is None:
            sent.append(b"frame %d" % len(sent))
            await alice.node.publish(ROOM, sent[-1])
            if alice.node.stats.lane_failures:
                failed = sent[-1]  # its write failed: it went over GossipSub too
            await trio.sleep(0.01)
            assert len(sent) < 200, "the broken lane was never noticed"
        assert alice.node.stats.direct_fallbacks == 1
        while not lanes_open((alice, bob)):  # the next frames go on the direct stream, and ask for a lane
            sent.append(b"frame %d" % len(sent))
            await alice.node.publish(ROOM, sent[-1])
            await trio.sleep(0.05)
            assert len(sent) < 400, "no new lane"
        sent.append(b"on the new lane")
        await alice.node.publish(ROOM, sent[-1])
        # At the switch a frame on the lane may overtake the last ones on the stream (the node's
        # tracker waits 0.5 s for such a gap to close before it repairs it from history).
        await wait_for(lambda: set(sent[sent.index(failed):]) <= set(bob.frames()), what="every frame since")
    # Frames written into the broken lane before its failure showed are lost to it: the node's
    # gap repair pulls those from history (tests/cluster); the rest came, once each.
    got = bob.frames()
    assert len(got) == len(set(got))
    assert alice.node.stats.lanes_opened == 2


async def test_a_peer_without_lanes_keeps_getting_frames_on_the_direct_stream():
    alice, bob = Peer(lanes=True), Peer(lanes=False)  # bob: --no-lanes, or an older node
    async with mesh(alice, bob):
        await alice.node.publish(ROOM, b"first")
        await wait_for(lambda: alice.node.stats.lane_failures >= 1, what="alice's lane refused")
        await alice.node.publish(ROOM, b"second")
        await wait_for(lambda: bob.frames() == [b"first", b"second"], what="both frames")
    assert bob.id not in alice.node._lanes and bob.node.stats.lanes_refused >= 1
    assert alice.node.stats.lane_frames_out == 0 and bob.node.stats.direct_frames_in == 2


async def test_a_lane_needs_a_token_offered_and_unused():
    alice, bob = Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob):
        await wait_for(lambda: lanes_open((alice, bob)), what="the lane")
        port = bob.node.lane_port_bound
        refused = bob.node.stats.lanes_refused
        for token in (os.urandom(lane.TOKEN_BYTES), b""):  # a made-up token; none at all
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            if token:
                await tcp.send_all(token)
            else:
                await tcp.send_eof()
            assert await tcp.receive_some(10) == b""  # closed without an answer
            await tcp.aclose()
        assert bob.node.stats.lanes_refused == refused + 2
        # a real offer works once
        stream = await alice.node.host.new_stream(ID.from_base58(bob.id), [p2p.LANE_PROTOCOL])
        port, token, key = lane.decode_offer(await p2p._read_exact(stream, lane.OFFER_BYTES))
        for attempt in range(2):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(token)
            answer = await tcp.receive_some(10)
            assert answer == (lane.ACCEPT if attempt == 0 else b"")
            await tcp.aclose()
        assert bob.node.stats.lanes_refused == refused + 3
    assert bob.got == []


async def test_a_peer_no_longer_admitted_gets_no_lane_and_loses_the_ones_it_has():
    alice, bob = Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob):
        await wait_for(lambda: lanes_open((alice, bob)), what="the lane")
        bob.admitted = {bob.id}  # alice's registration lapsed; bob has not cut her off yet
        refused = bob.node.stats.lanes_refused
        try:
            stream = await alice.node.host.new_stream(ID.from_base58(bob.id), [p2p.LANE_PROTOCOL])
            offer = await stream.read(lane.OFFER_BYTES)
        except Exception:  # reset during protocol negotiation, or after it
            offer = b""
        assert offer == b"" and bob.node.stats.lanes_refused == refused + 1  # no lane offered
        await bob.node.cut_off(alice.id)
        assert alice.id not in bob.node._lanes_in  # the lane she has is closed
        await wait_for(lambda: bob.id not in alice.node._lanes, what="alice's lane gone")
    assert bob.got == []


async def test_a_record_that_fails_authentication_strikes_its_sender_and_ends_its_lane():
    alice, bob = Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob):
        await wait_for(lambda: lanes_open((alice, bob)), what="the lane")
        stream = await alice.node.host.new_stream(ID.from_base58(bob.id), [p2p.LANE_PROTOCOL])
        port, token, _key = lane.decode_offer(await p2p._read_exact(stream, lane.OFFER_BYTES))
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(token)
        assert await tcp.receive_some(1) == lane.ACCEPT
        forged = lane.LaneCipher(os.urandom(lane.KEY_BYTES))  # not the key bob handed over
        await tcp.send_all(forged.seal(len(ROOM).to_bytes(2, "big") + ROOM.encode() + b"forged"))
        await wait_for(lambda: bob.node.stats.strikes == 1, what="the strike")
        assert await tcp.receive_some(10) == b""  # bob ended that lane
        await tcp.aclose()
        await alice.node.publish(ROOM, b"honest")  # alice's own lane is untouched
        await wait_for(lambda: bob.frames() == [b"honest"], what="the honest frame")


async def test_strangers_on_the_lane_port_are_bounded_and_timed_out(monkeypatch):
    monkeypatch.setattr(p2p, "MAX_LANES_WAITING", 3)
    monkeypatch.setattr(p2p, "LANE_TOKEN_WAIT_S", 0.5)
    alice, bob = Peer(lanes=True), Peer(lanes=True)
    async with mesh(alice, bob):
        await wait_for(lambda: lanes_open((alice, bob)), what="the lane")
        port, refused = bob.node.lane_port_bound, bob.node.stats.lanes_refused
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]  # say nothing
        await wait_for(lambda: bob.node._lanes_waiting == 3, what="three strangers waiting")
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        assert await extra.receive_some(10) == b""  # closed at once: too many waiting
        for tcp in silent:  # each closed once its time is up
            with trio.fail_after(5):
                assert await tcp.receive_some(10) == b""
        assert bob.node.stats.lanes_refused == refused + 4 and bob.node._lanes_waiting == 0
        for tcp in silent + [extra]:
            await tcp.aclose()
        await alice.node.publish(ROOM, b"still fine")  # the honest lane is untouched
        await wait_for(lambda: bob.frames() == [b"still fine"], what="the frame")
