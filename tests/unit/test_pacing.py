"""The publisher's frame pacer and how messages are cut into frames and bundles (pure logic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sms.node.core.envelope import (
    MAX_BUNDLE_BYTES,
    FrameError,
    decode_bundle,
    decode_frame,
    encode_bundle,
    encode_frame,
    split_into_bundles,
)
from sms.node.core.model import MAX_BODY_BYTES, Message, message_id_for
from sms.node.core.pacing import (COMMIT_FIRST_PACING, EARLY_FANOUT_PACING, CommitPacer, CommitPacing, DecayingRate,
                                  FramePacer, chunk_messages)


def message(i: int, body: str = "hi") -> Message:
    return Message(message_id_for("r", "u", f"t{i}"), "r", "u", body, 1 + i, f"t{i}", "o", i + 1, 3)


def test_a_quiet_node_publishes_at_once_then_waits_for_tokens_when_busy() -> None:
    pacer = FramePacer(max_rate=10, min_rate=10, burst=2)
    assert pacer.delay(100.0) == 0.0
    pacer.spend(100.0)
    assert pacer.delay(100.0) == 0.0
    pacer.spend(100.0)
    # The burst is spent: the next frame waits for a whole token (1/rate).
    assert pacer.delay(100.0) == pytest.approx(0.1)
    assert pacer.delay(100.05) == pytest.approx(0.05)
    assert pacer.delay(100.1) == 0.0
    pacer.spend(100.1)
    # After a long quiet spell the bucket is full again, but never fuller than the burst.
    assert pacer.delay(1000.0) == 0.0
    pacer.spend(1000.0)
    pacer.spend(1000.0)
    assert pacer.delay(1000.0) > 0.0


def test_over_any_stretch_the_frame_rate_stays_within_rate_plus_burst() -> None:
    pacer = FramePacer(max_rate=40, min_rate=40, burst=4)
    now, sent = 0.0, 0
    while now < 10.0:  # a publisher that always has something to send
        now += pacer.delay(now)
        pacer.spend(now)
        sent += 1
        now += 0.001  # the publish itself
    assert sent <= 40 * 10 + 4
    assert sent >= 40 * 10 * 0.9


def test_the_frame_rate_falls_as_the_message_rate_rises_and_recovers_when_it_drops() -> None:
    pacer = FramePacer(max_rate=50, min_rate=10, busy_messages_per_s=500)
    assert pacer.rate(0.0) == 50
    now = 0.0
    for _ in range(300):  # 3 s of 250 messages/s, noted 100 times a second
        now += 0.01
        pacer.note_messages(2 if _ % 2 else 3, now)
    assert pacer.rate(now) == pytest.approx(30, abs=2)  # half busy: half way down
    for _ in range(300):  # 3 s of 1,000 messages/s: beyond busy, the floor
        now += 0.01
        pacer.note_messages(10, now)
    assert pacer.rate(now) == pytest.approx(10)
    assert pacer.rate(now + 10.0) == pytest.approx(50, abs=0.1)  # quiet again


def test_a_busy_node_sends_fewer_frames_each_carrying_more() -> None:
    def frames_in_10s(messages_per_s: float) -> int:
        pacer = FramePacer(max_rate=50, min_rate=10, busy_messages_per_s=500)
        now, sent, pending, last = 0.0, 0, 0.0, 0.0
        while now < 10.0:
            now += max(pacer.delay(now), 0.002)  # the publish window
            pending += (now - last) * messages_per_s
            last = now
            pacer.spend(now)
            pacer.note_messages(int(pending), now)
            pending -= int(pending)
            sent += 1
        return sent

    assert frames_in_10s(2000) <= 10 * 10 + 4 + 20  # + the first second, while the estimate warms up
    assert frames_in_10s(2000) < frames_in_10s(100)


def test_in_a_bigger_cluster_each_node_gets_a_smaller_share_of_the_frame_budget() -> None:
    pacer = FramePacer(max_rate=20, min_rate=10)
    for nodes, rate in ((1, 20), (3, 20), (6, 10), (10, 6)):
        pacer.set_cluster_size(nodes)
        assert pacer.rate(0.0) == pytest.approx(rate)


def test_zero_rate_means_no_cap() -> None:
    pacer = FramePacer(max_rate=0)
    for _ in range(1000):
        assert pacer.delay(5.0) == 0.0
        pacer.spend(5.0)


def test_messages_are_cut_into_frames_that_fit_a_bundle_in_order() -> None:
    big = "x" * MAX_BODY_BYTES
    messages = [message(i, big if i % 3 == 0 else "small") for i in range(40)]
    chunks = chunk_messages(messages)
    assert [m for chunk in chunks for m in chunk] == messages
    frames = [encode_frame("r", "o", chunk) for chunk in chunks]
    assert all(len(f) < MAX_BUNDLE_BYTES // 2 for f in frames)
    bundles = split_into_bundles(frames)
    assert [f for group in bundles for f in group] == frames
    for group in bundles:
        data = encode_bundle("o", group)
        assert len(data) <= MAX_BUNDLE_BYTES
        assert decode_bundle(data) == ("o", group)


def test_small_messages_share_one_frame_and_one_bundle() -> None:
    messages = [message(i) for i in range(200)]
    chunks = chunk_messages(messages)
    assert chunks == [messages]
    assert len(split_into_bundles([encode_frame("r", "o", messages)] * 3)) == 1


@pytest.mark.parametrize("data, why", [
    (b"", "unknown bundle version"),
    (b"\x01" + b"\x90", "unknown bundle version"),            # a room frame is not a bundle
    (b"\x02\xc1", "undecodable"),
    (b"\x02\x92\xa1o\x90", "bad frame list"),                  # no frames at all
    (b"\x02\x92\xa1o\x91\xa3abc", "not bytes"),                # a frame that is a string
    (b"\x02\x92\x01\x91\xc4\x01x", "bad origin"),
])
def test_malformed_bundles_raise_frame_errors(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode_bundle(data)


def test_an_oversized_bundle_is_refused_before_decoding() -> None:
    with pytest.raises(FrameError, match="cap"):
        decode_bundle(b"\x02" + b"\x00" * MAX_BUNDLE_BYTES)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bundles_raise_only_frame_errors(data: bytes) -> None:
    try:
        origin, frames = decode_bundle(b"\x02" + data)
    except FrameError:
        return
    for raw in frames:  # what decodes is then decoded frame by frame, with the same guarantee
        try:
            decode_frame(raw)
        except FrameError:
            pass


def test_commits_are_not_paced_while_the_node_is_quiet() -> None:
    pacer = CommitPacer(max_gap_s=0.008, quiet_messages_per_s=300, busy_messages_per_s=600)
    assert pacer.wait(None, 0.0) == 0.0
    t = 0.0
    for _ in range(100):  # 100 messages/s, one per commit: a lone send commits at once
        t += 0.01
        pacer.note_messages(1, t)
        assert pacer.wait(t, t + 0.001) == 0.0


def test_a_busy_node_waits_up_to_the_gap_and_the_gap_shrinks_as_load_falls() -> None:
    pacer = CommitPacer(max_gap_s=0.008, quiet_messages_per_s=300, busy_messages_per_s=600)
    t = 0.0
    for _ in range(1000):  # 1,000 messages/s for 10 s, in commits of 10
        t += 0.01
        pacer.note_messages(10, t)
    assert pacer.gap(t) == pytest.approx(0.008)
    assert pacer.wait(t, t + 0.003) == pytest.approx(0.005)   # 3 ms after the last start
    assert pacer.wait(t, t + 0.010) == 0.0                    # the gap has passed
    # half-way between quiet and busy, about half the gap; and none once the load has decayed
    mid = t + math.log(1000 / 450)                             # the estimate decays from 1,000 to 450
    assert pacer.gap(mid) == pytest.approx(0.004, rel=0.05)
    assert pacer.gap(t + 10) == 0.0


def test_the_decaying_rate_estimates_a_steady_rate() -> None:
    rate = DecayingRate(window_s=1.0)
    assert rate.at(5.0) == 0.0
    t = 0.0
    for _ in range(1000):  # 200 events/s for 5 s
        t += 0.005
        rate.note(1, t)
    assert rate.at(t) == pytest.approx(200, rel=0.05)
    assert rate.at(t + 1.0) == pytest.approx(200 / math.e, rel=0.05)


@pytest.mark.parametrize("early_fanout", [True, False])
def test_by_default_a_busy_node_frames_each_commit_at_once(early_fanout: bool) -> None:
    # Once the frame pacer is at its floor its rate exceeds the commit pacer's highest commit
    # rate, and the commit gap is full by then: a commit's messages never wait for a frame token.
    from sms.node.config import NodeConfig

    config = NodeConfig("n", Path("."), "http://127.0.0.1:1", "postgresql://x", early_fanout=early_fanout)
    frames, pacing = FramePacer(), config.commit_pacing()
    # A node commits at most once per message and at most once per gap, at every load.
    q, b = pacing.quiet_messages_per_s, pacing.busy_messages_per_s

    def most_commits(load: float) -> float:
        gap = pacing.max_gap_s * min(1.0, max(0.0, load - q) / (b - q))
        return min(load, 1 / gap) if gap > 0 else load

    assert frames.min_rate > max(most_commits(load) for load in range(1, 5000))
    assert pacing.busy_messages_per_s <= frames.busy_messages_per_s
    assert config.lanes and config.frame_caps() == (frames.max_rate, frames.min_rate)
    assert config.busy_messages_per_s == frames.busy_messages_per_s


def test_commit_pacing_follows_the_mode_and_the_gap_given() -> None:
    from dataclasses import replace

    from sms.node.config import NodeConfig

    early = NodeConfig("n", Path("."), "http://127.0.0.1:1", "postgresql://x")
    first = replace(early, early_fanout=False)
    assert early.commit_pacing() == EARLY_FANOUT_PACING and first.commit_pacing() == COMMIT_FIRST_PACING
    # Commit first's is what CommitPacer measured; early fan-out's gap (in acks only) is longer
    # and starts sooner.
    assert COMMIT_FIRST_PACING.pacer() == CommitPacer()
    assert EARLY_FANOUT_PACING.max_gap_s > COMMIT_FIRST_PACING.max_gap_s
    assert EARLY_FANOUT_PACING.quiet_messages_per_s < COMMIT_FIRST_PACING.quiet_messages_per_s
    given = replace(early, commit_gap_ms=2.0).commit_pacing()
    assert given.max_gap_s == 0.002 and given.quiet_messages_per_s == EARLY_FANOUT_PACING.quiet_messages_per_s
    # A node whose own clients wait for its commits after all (no peer got its frames) paces as
    # commit first does.
    assert early.commit_pacing(deliveries_wait=True) == COMMIT_FIRST_PACING
    assert replace(early, commit_gap_ms=2.0).commit_pacing(deliveries_wait=True) == COMMIT_FIRST_PACING.with_max_gap(0.002)


def test_a_new_shape_carries_on_the_load_estimate() -> None:
    pacer = COMMIT_FIRST_PACING.pacer()
    t = 0.0
    for _ in range(1500):  # 300 messages/s for 5 s
        t += 1 / 300
        pacer.note_messages(1, t)
    assert pacer.gap(t) == 0.0                                  # below commit first's threshold
    carried = EARLY_FANOUT_PACING.pacer(carry=pacer)
    assert carried.gap(t) == pytest.approx(0.016, rel=0.02)      # full at once: the rate was known
    assert EARLY_FANOUT_PACING.pacer().gap(t) == 0.0            # a fresh one knows of no load


@pytest.mark.parametrize("args", [(-0.001, 300, 600), (0.004, 300, 300), (0.004, -1, 600)])
def test_a_commit_pacing_that_cannot_be_is_refused(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="commit gap"):
        CommitPacing(*args)


def test_the_pacer_of_a_pacing_waits_as_it_says() -> None:
    pacer = CommitPacing(0.016, 100, 300).pacer()
    t = 0.0
    for _ in range(1500):  # 300 messages/s for 5 s, one per commit: the gap is (nearly) full
        t += 1 / 300
        pacer.note_messages(1, t)
    assert pacer.wait(t, t) == pytest.approx(0.016, rel=0.02)
    assert pacer.wait(t, t + 0.010) == pytest.approx(0.006, abs=0.0005)  # the load decays a little meanwhile
