"""Scale modes.

conn-scale: many WebSocket connections across the nodes (default 10,000 over 3), a small fraction
of them chatting. Reports each node's RSS before and after the connections opened (memory per
connection), and the delivery latency of one measured point with everyone connected.

node-scale: fresh clusters of 1, 3, 5, 10 nodes, one offered rate each: throughput and system CPU per
delivered message (nodes + etcd + PostgreSQL CPU seconds / deliveries).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Callable

import trio

from .resources import Group, ResourceMonitor, _sample, cluster_groups, shield
from .results import result_doc, write_result
from .runner import point_line, point_record, quiet, scratch_dir, sms_system, with_cluster, workload_config
from .schedule import Workload, client_plan
from .sweep import SweepPolicy

Say = Callable[[str], None]
IDLE_S = 20.0  # conn-scale: measured seconds with every connection open and nobody chatting
PROBE_BUDGET_S = 180.0  # conn-scale: give up on the measured point if the probe takes longer


async def _healthz_ms(cluster: dict) -> list[float | None]:
    """How long each node takes to answer GET /healthz: its event loop's responsiveness."""
    import httpx

    out: list[float | None] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for n in cluster["nodes"]:
            t0 = time.monotonic()
            try:
                await http.get(n["http"] + "/healthz")
                out.append(round(1000 * (time.monotonic() - t0), 1))
            except httpx.HTTPError:
                out.append(None)
    return out


def _rss_by_group(groups) -> dict[str, float]:
    return {g.name: _sample(g)[1] for g in groups}


async def _conn_scale(cluster: dict, w: Workload, users: int, say: Say) -> dict:
    from .sms_client import SmsTransport

    plan = client_plan(w, len(cluster["nodes"]))
    groups = cluster_groups(cluster)
    if "_up_pid" in cluster:
        shield(groups + [Group("sms-up", "launcher", [cluster["_up_pid"]])], say)
    policy = SweepPolicy(start_rate=w.rate, max_rate=w.rate)
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        # The sockets run on one selectors loop thread (benchmarks/wsloop.py), as `sms bench run`'s:
        # with trio tasks the generator, not the nodes, was what ran out of CPU at 40 sends/s.
        transport = SmsTransport(cluster, plan, users=users, say=say, setup_concurrency=8, io="selectors")
        say(f"conn-scale: {w.clients} WebSockets over {len(cluster['nodes'])} nodes as {users} accounts, "
            f"{w.rooms} rooms, {w.senders} chatting at {w.rate:g} sends/s in all")
        await transport.prepare(stack)
        await trio.sleep(2.0)
        before = _rss_by_group(groups)
        t0 = time.monotonic()
        await transport.connect_loop()
        stack.callback(transport.stop_loop)
        connect_s = time.monotonic() - t0
        await trio.sleep(3.0)
        after = _rss_by_group(groups)
        memory = {}
        node_delta = 0.0
        for g in groups:
            delta = after[g.name] - before[g.name]
            memory[g.name] = {"rss_before_mb": round(before[g.name] / 2**20, 1),
                              "rss_after_mb": round(after[g.name] / 2**20, 1),
                              "delta_mb": round(delta / 2**20, 1)}
            if g.role == "node":
                node_delta += delta
        per_conn_node_kb = node_delta / w.clients / 1024
        gen_kb = (after["generator"] - before["generator"]) / w.clients / 1024
        say(f"  node memory per connection: {per_conn_node_kb:.1f} KiB; generator: {gen_kb:.1f} KiB; "
            f"connect time {connect_s:.1f}s")
        # Idle cost: nobody chats; what do the nodes spend, and what do they push, just holding on?
        idle_mon = ResourceMonitor(groups)
        frames0 = transport.frames
        t_idle = time.monotonic()
        await idle_mon.window(t_idle, t_idle + IDLE_S)
        idle_frames = transport.frames - frames0
        idle = {
            "seconds": IDLE_S,
            "frames_pushed_per_s": round(idle_frames / IDLE_S, 1),
            "node_cpu_percent": {k: v["cpu_percent"] for k, v in idle_mon.result.items() if v.get("role") == "node"},
            "generator_cpu_percent": idle_mon.result.get("generator", {}).get("cpu_percent"),
            "healthz_ms": await _healthz_ms(cluster),
        }
        say(f"  idle (nobody chatting) for {IDLE_S:g}s: the nodes pushed {idle['frames_pushed_per_s']} frames/s "
            f"to the clients; node CPU {idle['node_cpu_percent']}; GET /healthz took {idle['healthz_ms']} ms")
        points = []
        failure = None
        with trio.move_on_after(PROBE_BUDGET_S) as scope:
            try:
                await transport.finish()
            except Exception as exc:  # noqa: BLE001 - reported in the result
                failure = f"probe failed: {exc!r}"[:500]
        if scope.cancelled_caught:
            failure = f"the probe (one message per room, all members must receive it) did not finish in {PROBE_BUDGET_S:g}s"
        if failure is None:
            mon = ResourceMonitor(groups)
            rec = await transport.run_loop_point(w, 1, window=mon.window)
            p = point_record(rec, w, mon.result, policy, {"ws_open_at_end": transport.ws_open,
                                                          "ws_closed": dict(transport.ws_closed)})
            say(point_line("sms", p))
            points.append(p)
            await quiet(transport)
        else:
            say(f"  no measured point: {failure}")
        await transport.aclose()
        nursery.cancel_scope.cancel()
    return {
        "points": points,
        "failure": failure,
        "connections": w.clients,
        "accounts": users,
        "connect_s": round(connect_s, 1),
        "memory": memory,
        "node_kib_per_connection": round(per_conn_node_kb, 2),
        "idle": idle,
        "generator_kib_per_connection": round(gen_kb, 2),
    }


def conn_scale(cluster_file, nodes, connections, users, rooms, chatting, rate, duration, warmup, out: Path,
               work_dir, say: Say) -> Path:
    if users % rooms:
        raise SystemExit("--users must be a multiple of --rooms (each account's connections share its room)")
    senders = max(1, round(connections * chatting))
    w = Workload(clients=connections, senders=senders, rooms=rooms, rate=rate, duration_s=duration,
                 warmup_s=warmup, drain_s=5.0, max_in_flight=512).validate()
    stem = f"conn-scale-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.monotonic()
    with scratch_dir(work_dir, say) as wd, with_cluster(cluster_file, nodes, wd, say) as cluster:
        system = trio.run(_conn_scale, cluster, w, users, say)
        n = len(cluster["nodes"])
    cfg = workload_config(w, SweepPolicy(start_rate=rate, max_rate=rate), [rate], nodes=n, users=users,
                          chatting=chatting, wall_s=round(time.monotonic() - t0, 1))
    doc = result_doc("conn-scale", cfg, {"sms": system})
    path = write_result(doc, out, stem)
    say(f"wrote {path}")
    return path


def node_scale(counts: list[int], rate: float, clients: int, senders: int, rooms: int, duration: float,
               warmup: float, out: Path, work_dir, say: Say) -> Path:
    from .cli import make_plots

    w = Workload(clients=clients, senders=senders, rooms=rooms, rate=rate, duration_s=duration, warmup_s=warmup,
                 drain_s=5.0, max_in_flight=512).validate()
    policy = SweepPolicy(start_rate=rate, max_rate=rate)
    stem = f"node-scale-{time.strftime('%Y%m%d-%H%M%S')}"
    points = []
    t0 = time.monotonic()
    with scratch_dir(work_dir, say) as wd:
        for n in counts:
            with with_cluster(None, n, wd, say) as cluster:
                res = trio.run(sms_system, cluster, w, policy, [rate], say, None, None)
            p = res["points"][0]
            p["nodes"] = n
            node_cpu = sum(v["cpu_s"] for v in p["resources"].values() if v.get("role") == "node")
            p["node_cpu_ms_per_delivery"] = round(1000 * node_cpu / p["delivered"], 4) if p["delivered"] else None
            points.append(p)
    cfg = workload_config(w, policy, [rate], node_counts=counts, wall_s=round(time.monotonic() - t0, 1))
    doc = result_doc("node-scale", cfg, {"sms": {"points": points}})
    path = write_result(doc, out, stem)
    say(f"wrote {path}")
    for pth in make_plots(doc, out, stem):
        say(f"wrote {pth}")
    for p in points:
        say(f"  {p['nodes']:>2} nodes: {p['throughput']['deliveries_per_s']:g} deliveries/s, p99 {p['delivery_ms']['p99']} ms, "
            f"{p['cpu_ms_per_delivery']} ms system CPU per delivery, held={p['held']}")
    return path
