"""The node's garbage-collector policy (node/gcpolicy.py)."""

import gc
import logging

import pytest

from sms.node import gcpolicy
from sms.node.gcpolicy import PauseWatch, tune_collector


@pytest.fixture
def restore_threshold():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_young_collections_get_rarer_but_never_more_frequent(restore_threshold):
    gc.set_threshold(700, 10, 10)
    tune_collector(20_000)
    assert gc.get_threshold() == (20_000, 10, 10)
    gc.set_threshold(50_000, 10, 10)  # an operator's own larger setting is kept
    tune_collector(20_000)
    assert gc.get_threshold() == (50_000, 10, 10)


def test_every_pause_is_observed_and_slow_ones_are_logged_once_a_minute(caplog):
    now = [100.0]
    seen = []
    watch = PauseWatch(lambda generation, s: seen.append((generation, round(s, 3))), clock=lambda: now[0])

    def collection(generation, seconds):
        watch("start", {"generation": generation})
        now[0] += seconds
        watch("stop", {"generation": generation, "collected": 0})

    with caplog.at_level(logging.WARNING, logger="sms.gc"):
        collection(0, 0.002)
        collection(2, 0.5)
        collection(2, 0.4)           # slow too, but within the minute: counted, not logged
        now[0] += gcpolicy.SLOW_LOG_EVERY_S
        collection(1, 0.3)
    assert seen == [(0, 0.002), (2, 0.5), (2, 0.4), (1, 0.3)]
    assert watch.slow == 3
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2
    assert "generation 2" in logged[0] and "500 ms" in logged[0]
    assert "generation 1" in logged[1] and "3 pauses" in logged[1]


def test_a_stop_without_a_start_is_ignored():
    seen = []
    watch = PauseWatch(lambda g, s: seen.append(g))
    watch("stop", {"generation": 2})  # installed in the middle of a collection
    assert seen == []


def test_the_watch_sees_real_collections():
    seen = []
    watch = PauseWatch(lambda g, s: seen.append((g, s)))
    watch.install()
    try:
        watch.install()  # once only
        assert gc.callbacks.count(watch) == 1
        gc.collect(1)
    finally:
        watch.remove()
    assert watch not in gc.callbacks
    assert seen and seen[-1][0] == 1 and seen[-1][1] >= 0
