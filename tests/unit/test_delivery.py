from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sms.node.core.delivery import CursorCache, SeqTracker, decode_cursor, encode_cursor, missing_ranges
from sms.node.errors import BadRequest


def test_contiguous_mark_advances_over_filled_gaps() -> None:
    t = SeqTracker()
    assert t.add("r", "a", 1) and t.add("r", "a", 3)
    assert t.has_gaps("r") and t.contiguous("r", "a") == 1
    assert not t.add("r", "a", 3)
    assert t.add("r", "a", 2)
    assert t.contiguous("r", "a") == 3 and not t.has_gaps()


def test_settle_skips_burned_sequences() -> None:
    t = SeqTracker()
    t.add("r", "a", 1)
    t.add("r", "a", 4)
    t.settle("r", "a", 3)  # history holds nothing else up to 3: 2 and 3 were burned
    assert t.contiguous("r", "a") == 4 and not t.has_gaps()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("rs"), st.sampled_from("abc"), st.integers(1, 30)), max_size=80))
def test_tracker_agrees_with_a_set_model_and_cursors_round_trip(events) -> None:
    t, model = SeqTracker(), set()
    for room, origin, seq in events:
        assert t.add(room, origin, seq) == ((room, origin, seq) not in model)
        model.add((room, origin, seq))
    back = decode_cursor(encode_cursor(t))
    for room in "rs":
        for origin in "abc":
            for seq in range(1, 32):
                assert back.seen(room, origin, seq) == ((room, origin, seq) in model) == t.seen(room, origin, seq)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("rs"), st.sampled_from("abc"), st.integers(1, 6)), max_size=12),
                min_size=1, max_size=6))
def test_a_cached_cursor_is_the_one_encode_cursor_makes(histories) -> None:
    """Trackers fed different histories, some equal, some with gaps, some reaching the same
    counters in another order: the cache always answers what encode_cursor says for that tracker."""
    cache = CursorCache(max_entries=3)  # small: emptied along the way too
    for _ in range(2):
        for history in histories:
            t = SeqTracker()
            for room, origin, seq in history:
                t.add(room, origin, seq)
                assert cache.encode(t) == encode_cursor(t)


@pytest.mark.parametrize("bad", ["", "!!!", "AQ", "x" * 70000, encode_cursor(SeqTracker())[:-1] + "$"])
def test_bad_cursors_are_client_errors(bad: str) -> None:
    if bad == "":
        assert decode_cursor(encode_cursor(SeqTracker())).state() == {}
        with pytest.raises(BadRequest):
            decode_cursor(bad)
    else:
        with pytest.raises(BadRequest):
            decode_cursor(bad)


@given(st.integers(0, 30), st.integers(0, 60), st.lists(st.integers(0, 80), max_size=40))
@settings(max_examples=300, deadline=None)
def test_missing_ranges_are_exactly_what_history_lacks_above_the_mark(after: int, upto: int, held: list[int]) -> None:
    ranges = missing_ranges(after, upto, held)
    covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert covered == sorted(set(range(after + 1, upto + 1)) - set(held))  # in order, each once
    assert all(lo <= hi for lo, hi in ranges)
    assert all(a[1] + 1 < b[0] for a, b in zip(ranges, ranges[1:]))  # maximal runs


@given(st.lists(st.integers(1, 40), max_size=30), st.lists(st.tuples(st.integers(1, 40), st.integers(0, 8)), max_size=5))
@settings(max_examples=300, deadline=None)
def test_add_range_marks_exactly_those_sequences(delivered: list[int], burned: list[tuple[int, int]]) -> None:
    t = SeqTracker()
    model: set[int] = set()
    for seq in delivered:
        t.add("r", "o", seq)
        model.add(seq)
    for lo, length in burned:
        t.add_range("r", "o", lo, lo + length)
        model.update(range(lo, lo + length + 1))
    assert all(t.seen("r", "o", s) == (s in model) for s in range(1, 60))
    c = 0
    while c + 1 in model:
        c += 1
    assert t.contiguous("r", "o") == c


def test_lowest_is_the_first_sequence_recorded() -> None:
    t = SeqTracker()
    assert t.lowest("r", "o") is None and not t.knows("r", "o")
    t.add("r", "o", 1030)
    t.add("r", "o", 1026)
    assert t.lowest("r", "o") == 1026 and t.knows("r", "o")
    t.settle("r", "o", 5)
    assert t.lowest("r", "o") == 1
