from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt_strategies import (
    ROOM,
    crdt_settings,
    lww_maps,
    max_registers,
    op_universes,
    registers,
    scalar_values,
)
from sms.crdt.codec import FORMAT_VERSION, decode, encode
from sms.crdt.errors import CrdtDecodeError, PayloadTooLargeError
from sms.crdt.hlc import pack
from sms.crdt.lww import LWWMap, LWWRegister, MaxRegister
from sms.crdt.roomlog import Delta, EditEntry, MessageEntry, RoomLog
from sms.crdt.vv import VersionVector

SETTINGS = crdt_settings(150)

vvs = st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, (1 << 63) - 1), max_size=4).map(
    VersionVector
)
deltas = op_universes(max_ops=12).map(lambda ops: Delta(ROOM, tuple(ops)))
logs = op_universes(max_ops=12).map(lambda ops: RoomLog(ROOM, ops))
anything = st.one_of(vvs, registers(), lww_maps, max_registers, deltas, logs)


def _same(a: object, b: object) -> bool:
    if isinstance(a, RoomLog):
        return a == b and a.ordered() == b.ordered()  # type: ignore[union-attr]
    return a == b


# -- round trips


@SETTINGS
@given(anything)
def test_round_trip(obj: object) -> None:
    data = encode(obj)  # type: ignore[arg-type]
    assert data[0] == FORMAT_VERSION
    back = decode(data)
    assert type(back) is type(obj) and _same(back, obj)
    assert decode(data, type(obj)) is not None
    assert encode(back) == data  # deterministic


def test_examples_round_trip_and_are_compact() -> None:
    peer = "12D3KooWQ3ejXa5RXMW6Hpa4s4v5dXC5s7s9bvA8rK6VbqvGQ4Mz"  # a real-length peer id
    entries = tuple(
        MessageEntry(f"{i:032x}", ROOM, "alice", "hi", pack(1_700_000_000_000 + i, 0), peer, i + 1, f"t{i}")
        for i in range(100)
    ) + (EditEntry(f"{0:032x}", ROOM, "alice", None, pack(1_700_000_001_000, 0), peer, 101),)
    delta = Delta(ROOM, entries)
    data = encode(delta)
    assert decode(data, Delta) == delta
    # the origin is written once, not 101 times
    assert data.count(peer.encode()) == 1
    assert len(data) < 101 * 75
    m = LWWMap()
    m.set("bob", {"status": "away"}, 5, peer)
    m.delete("carol", 6, peer)
    assert decode(encode(m), LWWMap) == m
    assert decode(encode(MaxRegister((3, "x"), "x")), MaxRegister) == MaxRegister((3, "x"), "x")


# -- refusals


def test_wrong_expected_type() -> None:
    with pytest.raises(CrdtDecodeError):
        decode(encode(VersionVector({"a": 1})), Delta)


def test_size_cap_is_checked_before_parsing() -> None:
    data = encode(LWWRegister("x" * 1000, 1, "p"))
    with pytest.raises(PayloadTooLargeError):
        decode(data, max_bytes=100)
    assert decode(data, max_bytes=len(data)) == LWWRegister("x" * 1000, 1, "p")


def _raw(body: object, version: int = FORMAT_VERSION) -> bytes:
    return bytes([version]) + msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x02" + encode(VersionVector())[1:],  # unknown version
        encode(VersionVector({"a": 1})) + b"\x00",  # trailing bytes
        _raw([99, {}]),  # unknown tag
        _raw([]),
        _raw({"tag": 1}),
        _raw([1, {"a": -1}]),
        _raw([1, {"a": True}]),
        _raw([1, {"": 1}]),
        _raw([1, {"a": 1}, "extra"]),
        _raw([2, "v", 1, "p"]),  # register missing a field
        _raw([2, "v", -1, "p", False]),
        _raw([2, "v", 1, "p", True]),  # tombstone with a value
        _raw([2, msgpack.ExtType(5, b"x"), 1, "p", False]),
        _raw([3, {"k": [1, 1, "p"]}]),
        _raw([4, [1.5], None]),
        _raw([4, None, "orphan"]),
        _raw([5, ROOM, ["A"], [[0, 1, 1, 1, "m", "s", "b", "t"]]]),  # message row too short
        _raw([5, ROOM, ["A"], [[0, 5, 1, 1, "m", "s", "b", "t", 0]]]),  # origin index out of table
        _raw([5, ROOM, [7], [[0, 0, 1, 1, "m", "s", "b", "t", 0]]]),  # origin not a str
        _raw([5, ROOM, ["A"], [[2, 0, 1, 1, "m", "s", "b", 0]]]),  # unknown kind
        _raw([5, ROOM, ["A"], [[1, 0, 0, 1, "m", "s", None, 0]]]),  # seq 0
        _raw([5, 3, [], []]),
        _raw([6, ROOM, ["A"], [[0, 0, 1, 1, "m", "s", "b", "t", 0], [0, 0, 1, 1, "n", "s", "b", "t", 0]]]),
        b"\x01\xc1",  # msgpack's never-used byte
        b"\x01\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
        b"\x01" + b"\x91" * 5000 + b"\x00",  # nesting bomb
    ],
)
def test_malformed_inputs_raise_decode_error(data: bytes) -> None:
    with pytest.raises(CrdtDecodeError):
        decode(data)


def test_non_bytes_input() -> None:
    with pytest.raises(CrdtDecodeError):
        decode("not bytes")  # type: ignore[call-overload]


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for candidate in (data, bytes([FORMAT_VERSION]) + data):
        try:
            decode(candidate)
        except CrdtDecodeError:
            pass


@SETTINGS
@given(anything, st.data())
def test_corrupted_encodings_raise_only_decode_error(obj: object, data: st.DataObject) -> None:
    raw = bytearray(encode(obj))  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(bytes(raw[:cut]))
    except CrdtDecodeError:
        pass
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(raw))
    except CrdtDecodeError:
        pass


# Well-formed msgpack of plausible shapes reaches the parser, which random bytes rarely do.
shapes = st.recursive(
    st.one_of(scalar_values, st.integers(-2, 10), st.sampled_from(["A", ROOM, "m", ""])),
    lambda inner: st.one_of(st.lists(inner, max_size=9), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=20,
)


@SETTINGS
@given(st.integers(1, 7), st.lists(shapes, max_size=4))
def test_random_structures_raise_only_decode_error(tag: int, fields: list) -> None:
    try:
        decode(_raw([tag, *fields]))
    except CrdtDecodeError:
        pass
