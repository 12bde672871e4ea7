"""Workload plans, open-loop schedules and message keys (benchmarks/schedule.py)."""

import pytest

from sms.benchmarks.schedule import (
    MAX_MESSAGES, Workload, client_plan, host_plan, make_schedule, message_body, parse_body,
)


def test_uniform_schedule_is_evenly_spaced_and_bounded_by_the_duration():
    w = Workload(rate=100, duration_s=2, warmup_s=1, senders=4, clients=8, rooms=2)
    s = make_schedule(w)
    assert len(s) == 300
    assert s.times[0] == 0 and s.times[1] == pytest.approx(0.01)
    assert all(b > a for a, b in zip(s.times, s.times[1:]))
    assert max(s.times) < 3.0
    assert s.first_measured == 100          # t >= warm-up
    assert s.senders[:5] == (0, 1, 2, 3, 0)  # senders take turns


def test_poisson_schedule_is_seeded_and_near_the_rate():
    w = Workload(rate=200, duration_s=10, warmup_s=0, arrivals="poisson", seed=7)
    a, b = make_schedule(w), make_schedule(w)
    assert a == b
    assert 1800 < len(a) <= 2001
    assert all(y >= x for x, y in zip(a.times, a.times[1:]))
    assert make_schedule(Workload(rate=200, duration_s=10, warmup_s=0, arrivals="poisson", seed=8)) != a


def test_workload_limits():
    with pytest.raises(ValueError):
        Workload(senders=0).validate()
    with pytest.raises(ValueError):
        Workload(rate=MAX_MESSAGES, duration_s=10).validate()
    with pytest.raises(ValueError):
        Workload(arrivals="bursty").validate()


def test_client_plan_spreads_clients_over_nodes_and_rooms():
    w = Workload(clients=12, senders=3, rooms=3)
    plan = client_plan(w, nodes=4)
    # client c is member c // 3 of room c % 3, on node (c % 3 + c // 3) % 4
    assert plan.client_nodes == (0, 1, 2, 1, 2, 3, 2, 3, 0, 3, 0, 1)
    assert plan.members(1) == (1, 4, 7, 10)
    assert [plan.client_nodes[c] for c in plan.members(1)] == [1, 2, 3, 0]  # every node
    assert plan.senders == ((0, 0), (1, 1), (2, 2))
    # recipients: the room's members but the sender, on several nodes
    assert plan.recipients(1) == (4, 7, 10)
    assert len({plan.client_nodes[c] for c in plan.recipients(1)}) > 1


def test_host_plan_subscribes_every_host_to_every_room():
    plan = host_plan(Workload(clients=3, senders=6, rooms=3), hosts=3)
    assert plan.members(2) == (0, 1, 2)
    assert plan.senders[4] == (1, 1)
    assert plan.recipients(4) == (0, 2)


def test_message_bodies_have_the_requested_size_and_parse_back():
    body = message_body(3, 12345, 200)
    assert len(body.encode()) == 200
    assert parse_body(body) == (3, 12345)
    for junk in ("hello", "b3.x|", "b.1|", "probe-1", "b1.2"):
        assert parse_body(junk) is None
    with pytest.raises(ValueError):
        message_body(1, 10**20, 8)


@pytest.mark.parametrize("clients, senders, rooms, nodes", [
    (30, 6, 3, 3),        # the sweep's default: K = N, where node c % N put each room on one node
    (30, 6, 3, 5), (30, 6, 3, 10), (10000, 100, 50, 3), (100, 10, 7, 4),
])
def test_client_plan_spreads_every_room_over_the_nodes(clients, senders, rooms, nodes):
    """Deliveries must cross the mesh: a room with at least N members has members on every node,
    clients are balanced over the nodes, and the senders are spread too."""
    plan = client_plan(Workload(clients=clients, senders=senders, rooms=rooms), nodes)
    for r in range(rooms):
        members = plan.members(r)
        assert len({plan.client_nodes[c] for c in members}) == min(nodes, len(members))
    per_node = [plan.client_nodes.count(n) for n in range(nodes)]
    assert max(per_node) - min(per_node) <= 1 + clients // rooms // nodes
    # the first S clients send: rooms 0..K-1 on nodes 0..K-1, then the same rooms one node on
    assert len({plan.client_nodes[c] for c, _ in plan.senders}) >= min(nodes, senders, rooms + 1)
