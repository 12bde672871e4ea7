"""Hypothesis strategies shared by the crdt tests."""

from __future__ import annotations

from hypothesis import strategies as st

from sms.crdt.hlc import pack
from sms.crdt.lww import LWWMap, LWWRegister, MaxRegister

ORIGINS = ["peerA", "peerB", "peerC"]

origins = st.sampled_from(ORIGINS)
# Few distinct timestamps so ties (the interesting case) happen often.
timestamps = st.builds(pack, st.integers(0, 3), st.integers(0, 2))

scalar_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def registers(draw: st.DrawFn) -> LWWRegister:
    ts, origin = draw(timestamps), draw(origins)
    if draw(st.booleans()) and draw(st.booleans()):
        return LWWRegister.tombstone(ts, origin)
    return LWWRegister(draw(values), ts, origin)


lww_maps = st.dictionaries(st.sampled_from(["k1", "k2", "k3", "k4"]), registers(), max_size=4).map(
    LWWMap
)

sort_keys = st.one_of(
    st.integers(0, 5), st.text(max_size=2), st.lists(st.one_of(st.integers(0, 3), st.text(max_size=1)), max_size=3)
)
max_registers = st.one_of(
    st.just(MaxRegister()), st.builds(MaxRegister, sort_keys, st.one_of(st.none(), st.integers(0, 2)))
)
