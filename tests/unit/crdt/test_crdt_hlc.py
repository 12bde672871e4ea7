from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt_strategies import crdt_settings
from sms.crdt.errors import CrdtError, InvalidTimestampError
from sms.crdt.hlc import MAX_COUNTER, MAX_MS, MAX_TS, ClockDriftError, HybridClock, pack, unpack

SETTINGS = crdt_settings(200)

wall = st.integers(min_value=0, max_value=10**13)


def test_pack_unpack_layout() -> None:
    assert pack(1, 0) == 1 << 16
    assert pack(5, 7) == (5 << 16) | 7
    assert unpack(pack(123_456, 65_535)) == (123_456, 65_535)
    assert unpack(MAX_TS) == (MAX_MS, MAX_COUNTER)


@pytest.mark.parametrize(
    ("ms", "counter"), [(-1, 0), (0, -1), (0, 65_536), (MAX_MS + 1, 0), (1.0, 0), (True, 0)]
)
def test_pack_rejects_out_of_range(ms: object, counter: object) -> None:
    with pytest.raises(InvalidTimestampError):
        pack(ms, counter)  # type: ignore[arg-type]


@pytest.mark.parametrize("ts", [-1, MAX_TS + 1, "1", None, 1.5])
def test_unpack_rejects_garbage(ts: object) -> None:
    with pytest.raises(InvalidTimestampError):
        unpack(ts)  # type: ignore[arg-type]


@SETTINGS
@given(st.integers(0, MAX_MS), st.integers(0, MAX_COUNTER), st.integers(0, MAX_MS), st.integers(0, MAX_COUNTER))
def test_pack_preserves_order(ms1: int, c1: int, ms2: int, c2: int) -> None:
    assert (pack(ms1, c1) < pack(ms2, c2)) == ((ms1, c1) < (ms2, c2))


def test_now_follows_wall_clock_and_counts_within_a_millisecond() -> None:
    clock = HybridClock()
    assert clock.now(1000) == pack(1000, 0)
    assert clock.now(1000) == pack(1000, 1)
    assert clock.now(1001) == pack(1001, 0)
    assert clock.last == pack(1001, 0)


def test_now_is_monotonic_when_wall_clock_steps_back() -> None:
    clock = HybridClock()
    a = clock.now(5000)
    b = clock.now(4000)
    assert b == pack(5000, 1) and b > a


def test_counter_overflow_borrows_into_ms() -> None:
    clock = HybridClock(last=pack(7, MAX_COUNTER))
    assert clock.now(7) == pack(8, 0)
    clock = HybridClock(last=pack(7, MAX_COUNTER))
    assert clock.observe(pack(7, MAX_COUNTER), 7) == pack(8, 0)


def test_observe_takes_the_larger_physical_part() -> None:
    clock = HybridClock()
    clock.now(1000)
    # remote ahead (within drift): adopt its ms, bump its counter
    assert clock.observe(pack(1500, 3), 1000) == pack(1500, 4)
    # remote behind, wall ahead: wall wins with counter 0
    assert clock.observe(pack(10, 9), 2000) == pack(2000, 0)
    # same ms everywhere: max counter + 1
    assert clock.observe(pack(2000, 41), 2000) == pack(2000, 42)


def test_observe_rejects_drift_without_changing_state() -> None:
    clock = HybridClock(max_drift_ms=100)
    before = clock.now(1000)
    with pytest.raises(ClockDriftError) as info:
        clock.observe(pack(1101, 0), 1000)
    assert (info.value.remote_ms, info.value.local_ms, info.value.max_drift_ms) == (1101, 1000, 100)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CrdtError)
    assert clock.last == before
    # exactly at the limit is accepted
    assert clock.observe(pack(1100, 0), 1000) == pack(1100, 1)


def test_observe_rejects_malformed_remote_without_changing_state() -> None:
    clock = HybridClock()
    before = clock.now(1000)
    for bad in (-1, MAX_TS + 1, "x"):
        with pytest.raises(InvalidTimestampError):
            clock.observe(bad, 1000)  # type: ignore[arg-type]
    assert clock.last == before


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        HybridClock(max_drift_ms=-1)
    with pytest.raises(InvalidTimestampError):
        HybridClock(last=-5)
    assert HybridClock(last=pack(9, 9)).now(0) == pack(9, 10)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("now"), wall),
        st.tuples(st.just("observe"), wall, st.integers(0, 10**13), st.integers(0, MAX_COUNTER)),
    ),
    max_size=60,
)


@SETTINGS
@given(ops)
def test_every_timestamp_exceeds_everything_seen(script: list[tuple]) -> None:
    clock = HybridClock(max_drift_ms=60_000)
    seen = 0
    for op in script:
        if op[0] == "now":
            ts = clock.now(op[1])
            assert ts >= pack(op[1], 0)
        else:
            _, w, rms, rc = op
            remote = pack(rms, rc)
            try:
                ts = clock.observe(remote, w)
            except ClockDriftError:
                assert rms - w > 60_000
                assert clock.last == seen
                continue
            assert ts > remote and ts >= pack(w, 0)
        assert ts > seen
        assert clock.last == ts
        seen = ts


@SETTINGS
@given(st.lists(wall, min_size=1, max_size=50))
def test_clock_stays_within_drift_of_wall_time(walls: list[int]) -> None:
    """With no remote input and a monotonic wall clock, ms part never exceeds wall + issued count."""
    walls.sort()
    clock = HybridClock()
    for i, w in enumerate(walls):
        ms, _ = unpack(clock.now(w))
        assert w <= ms <= w + (i // (MAX_COUNTER + 1)) + 1
