"""Hypothesis strategies shared by the crdt tests."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from sms.crdt.hlc import pack
from sms.crdt.lww import LWWMap, LWWRegister, MaxRegister

ORIGINS = ["peerA", "peerB", "peerC"]

# SMS_CRDT_FUZZ_SCALE=50 turns the quick CI run into a soak run without editing the tests.
_SCALE = int(os.environ.get("SMS_CRDT_FUZZ_SCALE", "1"))


def crdt_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * _SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )

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


# -- room log op universes ---------------------------------------------------------------------------

from sms.crdt.hlc import HybridClock  # noqa: E402
from sms.crdt.roomlog import EditEntry, Entry, MessageEntry  # noqa: E402

ROOM = "room1"


@st.composite
def op_universes(draw: st.DrawFn, max_ops: int = 25) -> list[Entry]:
    """Ops as honest origins would author them: per-origin seqs 1..n, HLC timestamps, message ids
    from a small pool (so a "retry" accepted by two origins happens), edits and deletions that may
    target messages that come later or never."""
    clocks = {o: HybridClock() for o in ORIGINS}
    seqs = {o: 0 for o in ORIGINS}
    wall = 0
    ops: list[Entry] = []
    for _ in range(draw(st.integers(0, max_ops))):
        origin = draw(origins)
        wall += draw(st.integers(0, 3))
        # Peers' walls are skewed a little, and they hear of each other's ops sometimes.
        ts = clocks[origin].now(wall + ORIGINS.index(origin))
        if ops and draw(st.booleans()):
            ts = clocks[origin].observe(draw(st.sampled_from(ops)).ts, wall)
        seqs[origin] += 1
        k = draw(st.integers(0, 5))
        kind = draw(st.sampled_from(["msg", "msg", "edit", "delete"]))
        if kind == "msg":
            ops.append(
                MessageEntry(f"m{k}", ROOM, f"user{k}", draw(st.sampled_from(["hi", "yo", ""])), ts,
                             origin, seqs[origin], f"t{k}")
            )
        else:
            body = None if kind == "delete" else draw(st.sampled_from(["e1", "e2"]))
            ops.append(EditEntry(f"m{k}", ROOM, f"user{k}", body, ts, origin, seqs[origin]))
    return ops
