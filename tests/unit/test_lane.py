"""The fast lane's pure parts (node/adapters/lane.py): records sealed and opened in order, any
change to them refused; records split from reads cut anywhere; one-time, expiring, bounded offers."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sms.node.adapters import lane
from sms.node.errors import PeerError

KEY = bytes(range(32))


def test_records_open_in_the_order_they_were_sealed():
    sender, receiver = lane.LaneCipher(KEY), lane.LaneCipher(KEY)
    bodies = [b"", b"a", os.urandom(3000)]
    for body in bodies:
        record = sender.seal(body)
        assert int.from_bytes(record[:4], "big") == len(body) + lane.TAG_BYTES == len(record) - 4
        assert body not in record[4:] or not body  # sealed, not in clear
        assert receiver.open(record[:4], record[4:]) == body


def test_a_changed_replayed_or_reordered_record_fails_to_open():
    sender = lane.LaneCipher(KEY)
    first, second = sender.seal(b"first"), sender.seal(b"second")

    changed = bytearray(first)
    changed[-1] ^= 1
    with pytest.raises(lane.LaneError):
        lane.LaneCipher(KEY).open(bytes(changed[:4]), bytes(changed[4:]))
    with pytest.raises(lane.LaneError):  # the length header is authenticated too
        lane.LaneCipher(KEY).open((99).to_bytes(4, "big"), first[4:])
    with pytest.raises(lane.LaneError):  # second before first
        lane.LaneCipher(KEY).open(second[:4], second[4:])
    replayed = lane.LaneCipher(KEY)
    replayed.open(first[:4], first[4:])
    with pytest.raises(lane.LaneError):  # first again
        replayed.open(first[:4], first[4:])
    with pytest.raises(lane.LaneError):  # another key
        lane.LaneCipher(bytes(32)).open(first[:4], first[4:])
    assert issubclass(lane.LaneError, PeerError)  # the node strikes the peer for it


def test_a_key_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError):
        lane.LaneCipher(b"short")


@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=20), cuts=st.lists(st.integers(0, 8000)))
def test_records_split_from_reads_cut_anywhere(bodies, cuts):
    sender, receiver = lane.LaneCipher(KEY), lane.LaneCipher(KEY)
    wire = b"".join(sender.seal(b) for b in bodies)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    splitter, got = lane.RecordSplitter(max_body_bytes=300), []
    for a, b in zip(points, points[1:]):
        got.extend(receiver.open(h, s) for h, s in splitter.feed(wire[a:b]))
    assert got == bodies


@pytest.mark.parametrize("size", [0, lane.TAG_BYTES - 1, 100 + lane.TAG_BYTES + 1, 2**32 - 1])
def test_a_record_size_out_of_bounds_is_refused_before_its_body_comes(size):
    with pytest.raises(lane.LaneError, match="out of bounds"):
        lane.RecordSplitter(max_body_bytes=100).feed(size.to_bytes(4, "big"))


def test_an_offer_is_good_once_and_until_it_expires():
    offers = lane.LaneOffers(ttl_s=10.0)
    token, key = offers.issue("peer-a", now=100.0)
    assert len(token) == lane.TOKEN_BYTES and len(key) == lane.KEY_BYTES
    assert offers.take(token, now=105.0) == ("peer-a", key)
    assert offers.take(token, now=105.0) is None  # used up
    late, _ = offers.issue("peer-a", now=100.0)
    assert offers.take(late, now=110.5) is None
    assert offers.take(os.urandom(lane.TOKEN_BYTES), now=100.0) is None
    assert offers.issue("peer-b", 0.0)[1] != offers.issue("peer-b", 0.0)[1]  # a fresh key each time


def test_offers_not_taken_are_bounded_and_expire():
    offers = lane.LaneOffers(ttl_s=10.0, max_offers=3)
    tokens = [offers.issue("peer", now=0.0)[0] for _ in range(5)]
    assert len(offers) == 3
    assert offers.take(tokens[0], now=1.0) is None  # the oldest went first
    assert offers.take(tokens[4], now=1.0) is not None
    offers.issue("peer", now=50.0)  # issuing drops what expired
    assert len(offers) == 1


def test_an_offer_round_trips_and_a_bad_one_is_refused():
    token, key = os.urandom(lane.TOKEN_BYTES), os.urandom(lane.KEY_BYTES)
    assert lane.decode_offer(lane.encode_offer(4242, token, key)) == (4242, token, key)
    with pytest.raises(lane.LaneError):
        lane.decode_offer(b"short")
    with pytest.raises(lane.LaneError):
        lane.decode_offer(lane.encode_offer(0, token, key))
