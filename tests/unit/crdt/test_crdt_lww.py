from __future__ import annotations

import pytest
from hypothesis import given

from crdt_strategies import crdt_settings, lww_maps, max_registers, registers, values
from sms.crdt.errors import CrdtValueError, InvalidTimestampError
from sms.crdt.hlc import pack
from sms.crdt.lww import LWWMap, LWWRegister, MaxRegister

SETTINGS = crdt_settings(150)


# -- LWWRegister


def test_register_newest_wins_and_origin_breaks_ties() -> None:
    old = LWWRegister("old", pack(1, 0), "peerB")
    new = LWWRegister("new", pack(2, 0), "peerA")
    assert old.merge(new) is new and new.merge(old) is new
    a = LWWRegister("a", pack(5, 0), "peerA")
    b = LWWRegister("b", pack(5, 0), "peerB")
    assert a.merge(b) is b and b.merge(a) is b


def test_register_same_origin_same_ts_is_still_deterministic() -> None:
    x = LWWRegister("x", pack(5, 0), "peerA")
    y = LWWRegister("y", pack(5, 0), "peerA")
    assert x.merge(y) == y.merge(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(value=object(), ts=1, origin="p"),
        dict(value=float("nan"), ts=1, origin="p"),
        dict(value=1, ts=-1, origin="p"),
        dict(value=1, ts=1, origin=""),
        dict(value=1, ts=1, origin="p", deleted=True),
        dict(value=1, ts=1, origin="p", deleted=1),
        dict(value={1: 2}, ts=1, origin="p"),
    ],
)
def test_register_rejects_malformed(kwargs: dict) -> None:
    with pytest.raises(CrdtValueError):
        LWWRegister(**kwargs)


def test_register_normalises_tuples_to_lists() -> None:
    assert LWWRegister((1, (2, 3)), 1, "p").value == [1, [2, 3]]


@SETTINGS
@given(registers(), registers(), registers())
def test_register_merge_is_a_join(a: LWWRegister, b: LWWRegister, c: LWWRegister) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a


@SETTINGS
@given(values)
def test_any_value_round_trips_through_a_register(v: object) -> None:
    reg = LWWRegister(v, 1, "p")
    assert reg == LWWRegister(reg.value, 1, "p")


# -- LWWMap


def test_map_set_get_delete() -> None:
    m = LWWMap()
    assert m.set("alice", {"status": "online"}, pack(10, 0), "peerA")
    assert m.get("alice") == {"status": "online"} and "alice" in m and len(m) == 1
    # an older write loses and reports so
    assert not m.set("alice", "stale", pack(9, 0), "peerB")
    assert m.delete("alice", pack(11, 0), "peerB")
    assert m.get("alice") is None and "alice" not in m and len(m) == 0 and list(m) == []
    assert m.register("alice") == LWWRegister.tombstone(pack(11, 0), "peerB")
    # a set concurrent with, but older than, the delete does not resurrect the key
    assert not m.set("alice", "zombie", pack(10, 5), "peerC")
    assert m.set("alice", "back", pack(12, 0), "peerA")
    assert m.items() == [("alice", "back")]


def test_map_apply_is_all_or_nothing() -> None:
    m = LWWMap()
    with pytest.raises(CrdtValueError):
        m.apply({"good": LWWRegister(1, 1, "p"), 5: LWWRegister(1, 1, "p")})  # type: ignore[dict-item]
    with pytest.raises(CrdtValueError):
        m.apply({"good": LWWRegister(1, 1, "p"), "bad": "not a register"})  # type: ignore[dict-item]
    assert m.registers() == {}


def test_map_delta_since_and_pruning() -> None:
    m = LWWMap()
    m.set("a", 1, pack(1, 0), "p")
    m.set("b", 2, pack(3, 0), "p")
    m.delete("c", pack(2, 0), "p")
    assert set(m.delta_since(pack(1, 0))) == {"b", "c"}
    peer = LWWMap()
    peer.apply(m.delta_since(0))
    assert peer == m
    assert m.prune_tombstones(pack(2, 0)) == 0
    assert m.prune_tombstones(pack(2, 1)) == 1
    assert m.register("c") is None
    with pytest.raises(InvalidTimestampError):
        m.prune_tombstones(-1)


@SETTINGS
@given(lww_maps, lww_maps, lww_maps)
def test_map_merge_is_a_join(a: LWWMap, b: LWWMap, c: LWWMap) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a


@SETTINGS
@given(lww_maps, lww_maps)
def test_map_apply_returns_exactly_the_changes(a: LWWMap, b: LWWMap) -> None:
    before = a.copy()
    won = a.apply(b.registers())
    for k, reg in b.registers().items():
        assert (k in won) == (before.register(k) is None or before.register(k).merge(reg) is not before.register(k))
    assert a.apply(b.registers()) == {}


# -- MaxRegister


def test_max_register_only_moves_forward() -> None:
    r = MaxRegister()
    assert r.empty
    r = r.advance((5, "m5"), "m5")
    assert r.key == (5, "m5")
    assert r.advance((4, "m9"), "m9") is r
    r2 = r.advance((6, "m1"), "m1")
    assert r2.value == "m1" and r2.ahead_of(r) and not r.ahead_of(r2)
    assert MaxRegister(3, "x") == MaxRegister((3,), "x")
    # mixed types at one position never raise
    assert MaxRegister(("a",)).merge(MaxRegister((1,))) == MaxRegister(("a",))


@pytest.mark.parametrize("key", [1.5, None, [[1]], (b"x",), tuple(range(17))])
def test_max_register_rejects_bad_keys(key: object) -> None:
    with pytest.raises(CrdtValueError):
        MaxRegister().advance(key) if key is not None else MaxRegister(None, "orphan value")


@SETTINGS
@given(max_registers, max_registers, max_registers)
def test_max_register_merge_is_a_join(a: MaxRegister, b: MaxRegister, c: MaxRegister) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    assert not a.ahead_of(a.merge(b)) and not b.ahead_of(a.merge(b))
