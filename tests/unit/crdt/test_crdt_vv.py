from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt_strategies import crdt_settings
from sms.crdt.errors import CrdtValueError
from sms.crdt.vv import Ordering, SeqRange, VersionVector

SETTINGS = crdt_settings(150)

origins = st.sampled_from(["peerA", "peerB", "peerC", "peerD"])
vvs = st.dictionaries(origins, st.integers(0, 20)).map(VersionVector)


def test_basics() -> None:
    vv = VersionVector({"b": 2, "a": 1, "z": 0})
    assert vv.get("a") == 1 and vv.get("nobody") == 0
    assert list(vv) == ["a", "b"]  # zero dropped, sorted
    assert vv == VersionVector({"a": 1, "b": 2})
    assert hash(vv) == hash(VersionVector({"b": 2, "a": 1}))
    assert vv.advanced("a", 5).get("a") == 5
    assert vv.advanced("a", 0) is vv


@pytest.mark.parametrize("bad", [{"": 1}, {"a": -1}, {"a": 1.0}, {"a": True}, {1: 1}, {"a": 1 << 63}])
def test_rejects_malformed(bad: dict) -> None:
    with pytest.raises(CrdtValueError):
        VersionVector(bad)


def test_compare_and_missing() -> None:
    a = VersionVector({"x": 3, "y": 1})
    b = VersionVector({"x": 5, "z": 2})
    assert a.compare(b) is Ordering.CONCURRENT
    assert a.compare(a.merge(b)) is Ordering.BEFORE
    assert a.merge(b).compare(a) is Ordering.AFTER
    assert a.compare(VersionVector({"y": 1, "x": 3})) is Ordering.EQUAL
    assert a.missing(b) == [SeqRange("x", 4, 5), SeqRange("z", 1, 2)]
    assert len(SeqRange("x", 4, 5)) == 2 and 5 in SeqRange("x", 4, 5) and 6 not in SeqRange("x", 4, 5)


@SETTINGS
@given(vvs, vvs, vvs)
def test_merge_is_a_join(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    m = a.merge(b)
    assert m.dominates(a) and m.dominates(b)


@SETTINGS
@given(vvs, vvs)
def test_missing_is_exactly_what_merge_adds(a: VersionVector, b: VersionVector) -> None:
    filled = a
    for r in a.missing(b):
        assert r.first == a.get(r.origin) + 1 and r.last == b[r.origin]
        filled = filled.advanced(r.origin, r.last)
    assert filled == a.merge(b)
    assert (a.missing(b) == []) == a.dominates(b)


@SETTINGS
@given(vvs, vvs)
def test_compare_is_consistent(a: VersionVector, b: VersionVector) -> None:
    flipped = {
        Ordering.EQUAL: Ordering.EQUAL,
        Ordering.BEFORE: Ordering.AFTER,
        Ordering.AFTER: Ordering.BEFORE,
        Ordering.CONCURRENT: Ordering.CONCURRENT,
    }
    assert b.compare(a) is flipped[a.compare(b)]
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)
