"""Sweep decisions (benchmarks/sweep.py) and the Recorder's accounting (benchmarks/recorder.py)."""

from sms.benchmarks.recorder import Recorder
from sms.benchmarks.schedule import Workload, client_plan, make_schedule, message_body, parse_body
from sms.benchmarks.sweep import SweepPolicy, SweepState, verdict


def point(p99=10.0, lost=0, expected=100, errors=0, not_sent=0, delivered=None):
    delivered = expected - lost if delivered is None else delivered
    return {"delivery_ms": {"p99": p99}, "lost": lost, "expected_deliveries": expected,
            "loss_ratio": lost / expected if expected else 0.0, "delivered": delivered,
            "send_errors": errors, "not_sent": not_sent}


def test_verdict():
    assert verdict(point()) == (True, [])
    assert not verdict(point(p99=100.01))[0]
    assert verdict(point(p99=100.0))[0]
    assert not verdict(point(lost=1))[0]
    assert not verdict(point(errors=1))[0]
    assert not verdict(point(not_sent=3))[0]
    assert "nothing delivered" in verdict(point(expected=0, delivered=0))[1]


def test_failed_sends_are_named_by_kind_and_a_rate_limit_says_what_to_do():
    refused = {**point(errors=12), "error_kinds": {"http_429": 10, "timeout": 2}}
    held, reasons = verdict(refused)
    assert not held
    assert reasons[0].startswith("12 sends failed (http_429: 10, timeout: 2)")
    assert "SMS_RATE_LIMIT=1000000" in reasons[0]
    held, reasons = verdict({**point(errors=2), "error_kinds": {"timeout": 2}})
    assert reasons == ["2 sends failed (timeout: 2)"]


def run(policy, holds):
    """Drive a sweep where a rate holds iff holds(rate)."""
    state = SweepState(policy)
    rates = []
    while (r := state.next_rate()) is not None:
        rates.append(r)
        state.record(r, holds(r))
        assert len(rates) <= policy.max_points
    return rates, state


def test_sweep_doubles_then_bisects_once_and_reports_the_best_held_rate():
    rates, state = run(SweepPolicy(start_rate=50, factor=2, refine=1), lambda r: r <= 250)
    assert rates == [50, 100, 200, 400, 300]
    assert state.best == 200 and state.stop_reason() == "failed above the best rate"


def test_sweep_refines_toward_the_knee():
    rates, state = run(SweepPolicy(start_rate=100, factor=2, refine=3), lambda r: r <= 330)
    assert rates == [100, 200, 400, 300, 350, 325]
    assert state.best == 325


def test_sweep_stops_at_max_rate_and_max_points():
    rates, state = run(SweepPolicy(start_rate=100, factor=3, max_rate=500), lambda r: True)
    assert rates == [100, 300, 500] and state.stop_reason() == "max_rate reached while still holding"
    rates, state = run(SweepPolicy(start_rate=1, factor=2, max_points=4), lambda r: True)
    assert rates == [1, 2, 4, 8] and state.stop_reason() == "max_points reached while still holding"


def test_sweep_whose_first_point_fails_has_no_answer():
    rates, state = run(SweepPolicy(start_rate=100), lambda r: False)
    assert rates == [100] and state.best is None


def test_recorder_counts_latency_loss_duplicates_and_errors():
    w = Workload(clients=6, senders=2, rooms=2, rate=10, duration_s=1, warmup_s=0)
    plan = client_plan(w, nodes=3)          # room 0: clients 0, 2, 4; room 1: 1, 3, 5
    sched = make_schedule(w)                # 10 messages, sender m % 2
    rec = Recorder(plan, sched, point=1, start_at=100.0)
    for m in range(10):
        rec.on_send(m, 100.0 + sched.times[m])
    assert rec.outstanding == 20
    rec.on_ack(0, 100.01)
    rec.on_body(2, message_body(1, 0, 64), 100.02, parse_body)   # 20 ms
    rec.on_body(4, message_body(1, 0, 64), 100.03, parse_body)   # 30 ms
    rec.on_body(4, message_body(1, 0, 64), 100.04, parse_body)   # duplicate
    rec.on_body(0, message_body(1, 0, 64), 100.04, parse_body)   # the sender's own echo
    rec.on_body(2, message_body(9, 0, 64), 100.04, parse_body)   # another point's
    rec.on_ack(1, 100.2, ok=False, error="http_503")             # expects nothing any more
    s = rec.summary(duration_s=1.0, cdf=0)
    assert s["sent"] == 10 and s["send_errors"] == 1 and s["error_kinds"] == {"http_503": 1}
    assert s["expected_deliveries"] == 18 and s["delivered"] == 2 and s["lost"] == 16
    assert s["duplicates"] == 1 and rec.echoes == 1 and rec.strays == 1
    assert s["delivery_ms"]["p50"] == 25.0 and s["ack_ms"]["max"] == 10.0
    assert rec.outstanding == 16
    # clients 2 and 4 sit on nodes 1 and 2, the sender (client 0) on node 0
    assert s["delivery_ms_other_node"]["count"] == 2 and s["delivery_ms_same_node"]["count"] == 0


def test_recorder_splits_latency_by_whether_the_recipient_shares_the_senders_node():
    w = Workload(clients=4, senders=1, rooms=1, rate=10, duration_s=1, warmup_s=0)
    plan = client_plan(w, nodes=2)          # one room; clients 0, 2 on node 0 and 1, 3 on node 1
    assert plan.client_nodes == (0, 1, 0, 1)
    rec = Recorder(plan, make_schedule(w), point=1, start_at=100.0)
    rec.on_send(0, 100.0)
    rec.on_body(2, message_body(1, 0, 64), 100.005, parse_body)  # same node: 5 ms
    rec.on_body(1, message_body(1, 0, 64), 100.040, parse_body)  # other node: 40 ms
    rec.on_body(3, message_body(1, 0, 64), 100.060, parse_body)  # other node: 60 ms
    s = rec.summary(duration_s=1.0, cdf=0)
    assert s["delivery_ms_same_node"]["count"] == 1 and s["delivery_ms_same_node"]["max"] == 5.0
    assert s["delivery_ms_other_node"]["count"] == 2 and s["delivery_ms_other_node"]["mean"] == 50.0
    assert s["delivery_ms"]["count"] == 3
    # the message reached its first recipient after 5 ms; the others 35 and 55 ms after that one
    assert s["first_delivery_ms"]["count"] == 1 and s["first_delivery_ms"]["max"] == 5.0
    assert s["fanout_spread_ms"]["count"] == 3 and s["fanout_spread_ms"]["max"] == 55.0
    assert s["fanout_spread_ms"]["p50"] == 35.0


def test_recorder_export_merge_round_trip():
    w = Workload(clients=3, senders=3, rooms=1, rate=10, duration_s=1, warmup_s=0)
    plan = client_plan(w, nodes=3)
    sched = make_schedule(w)
    a = Recorder(plan, sched, 1, 0.0)
    b = Recorder(plan, sched, 1, 0.0)
    a.on_send(0, 0.0)
    a.on_ack(0, 0.001)
    b.on_delivery(1, 0, 0.005)
    b.on_delivery(2, 0, 0.007)
    b.on_skip(3)
    merged = Recorder(plan, sched, 1, 0.0)
    merged.merge(a.export())
    merged.merge(b.export())
    s = merged.summary(1.0, cdf=0)
    assert s["delivered"] == 2 and s["lost"] == 0 and s["not_sent"] == 1
    assert s["delivery_ms"]["max"] == 7.0


def test_node_metrics_are_parsed_and_turned_into_messages_per_frame():
    from sms.benchmarks.runner import metrics_delta, parse_metrics

    text = ("# HELP x\nsms_sends_total 10.0\nsms_frames_published_total 4.0\nsms_sends_created 1.7e9\n"
            "sms_persist_seconds_sum 0.5\nsms_persist_seconds_count 10.0\nsms_send_errors_total{code=\"x\"} 3.0\n")
    m = parse_metrics(text)
    assert m == {"sms_sends_total": 10.0, "sms_frames_published_total": 4.0,
                 "sms_persist_seconds_sum": 0.5, "sms_persist_seconds_count": 10.0}
    d = metrics_delta([{}, {}], [m, {"sms_sends_total": 10.0, "sms_frames_published_total": 1.0}])
    assert d["sends"] == 20 and d["frames_published"] == 5 and d["messages_per_frame"] == 4.0
    assert d["persist_mean_ms"] == 50.0
