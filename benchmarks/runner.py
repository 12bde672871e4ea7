"""Orchestration: run points and sweeps against sms, NATS JetStream and raw GossipSub with the same
engine and Recorder, and turn them into result documents. The CLI (benchmarks/cli.py) calls these."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import anyio
import trio

from .cluster import local_cluster, raise_fd_limit
from .engine import run_point
from .recorder import Recorder
from .resources import Group, ResourceMonitor, cluster_groups, shield, wait_for_quiet
from .schedule import Workload, client_plan
from .sweep import SweepPolicy, SweepState, verdict

Say = Callable[[str], None]
SYSTEM_ROLES = ("node", "etcd", "postgres", "nats-server")
GEN_LAG_LIMIT_MS = 20.0   # the generator started sends this late (p99): it was short of CPU
GEN_CPU_LIMIT = 80.0      # percent of one core: the generator is one Python thread


def point_record(rec: Recorder, workload: Workload, resources: dict, policy: SweepPolicy, extra: dict | None = None) -> dict:
    p = rec.summary(workload.duration_s)
    p = {"offered_rate": workload.rate, "duration_s": workload.duration_s, **p}
    p["resources"] = resources
    system_cpu = sum(v["cpu_s"] for v in resources.values() if v.get("role") in SYSTEM_ROLES or v.get("role") == "node+generator")
    p["system_cpu_s"] = round(system_cpu, 3)
    p["cpu_ms_per_delivery"] = round(1000 * system_cpu / p["delivered"], 4) if p["delivered"] else None
    p["cpu_ms_per_send"] = round(1000 * system_cpu / p["sent"], 4) if p["sent"] else None
    gen = resources.get("generator", {})
    p["generator_cpu_percent"] = gen.get("cpu_percent")
    p["machine_cpu_percent"] = resources.get("machine", {}).get("cpu_percent")
    p["other_cpu_percent"] = resources.get("machine", {}).get("other_cpu_percent")
    p["runqueue_wait_percent"] = round(sum(v.get("runqueue_wait_percent", 0.0) for k, v in resources.items() if k != "machine"), 1)
    # The generator shares the machine: flag points where it started sends late (it was short of
    # CPU, because of its own work or because the machine was saturated by the system or others).
    lag99 = p["lag_ms"]["p99"] or 0.0
    p["generator_lagged"] = bool(lag99 > GEN_LAG_LIMIT_MS or (gen.get("cpu_percent") or 0) > GEN_CPU_LIMIT)
    held, reasons = verdict(p, policy.p99_limit_ms, policy.max_loss_ratio)
    p["held"], p["reasons"] = held, reasons
    if extra:
        p.update(extra)
    return p


def point_line(system: str, p: dict) -> str:
    d = p["delivery_ms"]
    first = p.get("first_delivery_ms") or {}
    return (f"  {system:9s} R={p['offered_rate']:>8g}/s  p50={d['p50']} p99={d['p99']} max={d['max']} ms  "
            f"first p99={first.get('p99')} ms  ack p99={p['ack_ms']['p99']} ms  lost={p['lost']}/{p['expected_deliveries']} dup={p['duplicates']} "
            f"err={p['send_errors']} notsent={p['not_sent']}  {p['throughput']['deliveries_per_s']:g} deliv/s  "
            f"gen cpu={p['generator_cpu_percent']}%  other cpu={p['other_cpu_percent']}%  runq wait={p.get('runqueue_wait_percent')}%  "
            + (f"msgs/frame={p['node_metrics']['messages_per_frame']}  " if p.get("node_metrics") else "")
            + f"{'HELD' if p['held'] else 'FAILED: ' + '; '.join(p['reasons'])}"
            f"{'  [generator lagged]' if p.get('generator_lagged') else ''}"
            f"{'  [disturbed]' if p.get('disturbed') else ''}")


async def quiet(transport, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Wait until no frame arrived for quiet_s (a failed point's backlog has drained), at most limit_s."""
    deadline = time.monotonic() + limit_s
    last = getattr(transport, "frames", 0)
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        await anyio.sleep(0.2)
        now = getattr(transport, "frames", 0)
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return


DISTURBED_PERCENT = 40.0   # other processes' CPU (percent of one core) that makes a point suspect
QUIET_WAIT_S = 30.0        # how long to wait for a quieter machine before each point (--quiet-wait)
RETRIES = 1                # repeats of a disturbed point, at most (--retries)


async def drive(run_rate: Callable[[float, int], Awaitable[dict]], policy: SweepPolicy, rates: list[float] | None,
                say: Say, name: str, groups: list[Group] | None = None, *, retries: int | None = None,
                quiet_wait_s: float | None = None) -> dict:
    """Fixed `rates`, or a sweep by `policy`. Returns the system's result entry.

    The machine is shared (other processes, other people's test runs): before each point we wait
    up to QUIET_WAIT_S for other processes to use at most DISTURBED_PERCENT of a core, and a point
    during which they used more is repeated up to RETRIES times; the least disturbed attempt is
    kept and every attempt's interference is recorded."""
    points: list[dict] = []
    state = SweepState(policy.validate())
    i = 0
    attempt_id = 0
    while True:
        if rates is not None:
            if i >= len(rates):
                break
            rate = rates[i]
        else:
            rate = state.next_rate()
            if rate is None:
                break
        i += 1
        attempts = []
        tries = 1 + (RETRIES if retries is None else retries)
        for attempt in range(tries):
            if groups is not None:
                await wait_for_quiet(groups, DISTURBED_PERCENT / 2, QUIET_WAIT_S if quiet_wait_s is None else quiet_wait_s, say)
            attempt_id += 1
            p = await run_rate(rate, attempt_id)
            attempts.append(p)
            other = p.get("other_cpu_percent")
            if other is None or other <= DISTURBED_PERCENT or attempt == tries - 1:
                break
            say(point_line(name, p))
            say(f"  disturbed: other processes used {other:.0f}% CPU during that point; repeating it")
        p = min(attempts, key=lambda a: a.get("other_cpu_percent") or 0.0)
        p["attempts"] = [{"other_cpu_percent": a.get("other_cpu_percent"), "held": a["held"],
                          "p99": a["delivery_ms"]["p99"]} for a in attempts]
        p["disturbed"] = (p.get("other_cpu_percent") or 0.0) > DISTURBED_PERCENT
        state.record(rate, p["held"])
        points.append(p)
        say(point_line(name, p))
    points.sort(key=lambda p: p["offered_rate"])
    held = [p["offered_rate"] for p in points if p["held"]]
    return {
        "points": points,
        "max_sustained_rate": max(held) if held else None,
        "stop_reason": state.stop_reason() if rates is None else "fixed rates",
    }


# -- sms

METRIC_NAMES = ("sms_sends_total", "sms_delivered_total", "sms_frames_published_total", "sms_frames_received_total",
                "sms_frames_rejected_total", "sms_persist_seconds_sum", "sms_persist_seconds_count")


def parse_metrics(text: str, names=METRIC_NAMES) -> dict[str, float]:
    """Pure: the unlabelled samples named in `names` from Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def scrape(cluster: dict) -> list[dict[str, float]]:
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=5) as http:
        for n in cluster["nodes"]:
            try:
                out.append(parse_metrics((await http.get(n["http"] + "/metrics")).text))
            except httpx.HTTPError:
                out.append({})
    return out


async def fanout_mode(cluster: dict) -> str | None:
    """How the cluster's nodes send a message on ("early fan-out" or "commit first", from node 0's
    /v1/status), so that a result says which sms it measured; None if the node did not say."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=5) as http:
            early = (await http.get(cluster["nodes"][0]["http"] + "/v1/status")).json()["pacing"]["early_fanout"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return "early fan-out" if early else "commit first"


def metrics_delta(before: list[dict], after: list[dict]) -> dict:
    """Cluster-wide counter deltas over a point, and what they mean per message."""
    tot = {k: sum(a.get(k, 0.0) - b.get(k, 0.0) for a, b in zip(after, before)) for k in METRIC_NAMES}
    sends, frames = tot["sms_sends_total"], tot["sms_frames_published_total"]
    return {
        "sends": int(tot["sms_sends_total"]),
        "frames_published": int(frames),
        "frames_received": int(tot["sms_frames_received_total"]),
        "frames_rejected": int(tot["sms_frames_rejected_total"]),
        "messages_per_frame": round(sends / frames, 2) if frames else None,
        "persist_mean_ms": round(1000 * tot["sms_persist_seconds_sum"] / tot["sms_persist_seconds_count"], 2)
        if tot["sms_persist_seconds_count"] else None,
    }


async def sms_system(cluster: dict, workload: Workload, policy: SweepPolicy, rates: list[float] | None, say: Say,
                     users: int | None = None, profile: dict | None = None, send_via: str = "ws",
                     name: str = "sms") -> dict:
    """Runs points against a running cluster. profile={"rate": R, "dir": Path} runs py-spy on node 0
    during the point at rate R (or the last point). send_via: "ws" (send frames on the events
    socket) or "http" (PUT). `name` labels the points (sms-commit-first: nodes with --commit-first)."""
    from .sms_client import SmsTransport

    plan = client_plan(workload, len(cluster["nodes"]))
    groups = cluster_groups(cluster)
    if "_up_pid" in cluster:  # a cluster this run started
        shield(groups + [Group("sms-up", "launcher", [cluster["_up_pid"]])], say)
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        # Sends over the events sockets run on one selectors loop thread (benchmarks/wsloop.py):
        # trio's per-message work was most of the generator's CPU, taken from the nodes.
        io = "selectors" if send_via == "ws" else "trio"
        transport = SmsTransport(cluster, plan, users=users, say=say, send_via=send_via, io=io)
        say(f"sms: {workload.clients} clients over {len(cluster['nodes'])} nodes, {workload.senders} senders, "
            f"{workload.rooms} rooms, {workload.body_bytes} B bodies, sends over {send_via}")
        await transport.setup(stack, nursery)
        profiles: list[dict] = []

        async def run_rate(rate: float, i: int) -> dict:
            w = replace(workload, rate=rate)
            mon = ResourceMonitor(groups)
            spy = None
            if profile is not None and (profile.get("rate") is None or abs(profile["rate"] - rate) < 1e-9):
                spy = start_py_spy(cluster["nodes"][0]["pid"], w, Path(profile["dir"]), f"sms-node0-R{rate:g}")
            before = await scrape(cluster)
            frames_before = transport.frames
            if transport.loop is not None:
                rec = await transport.run_loop_point(w, i, window=mon.window)
            else:
                rec = await run_point(transport, plan, w, i, run_tag=transport.tag, window=mon.window)
            after = await scrape(cluster)
            # WebSocket frames the clients read during the point (warm-up and drain included):
            # with batch=1 a frame carries every event queued for its client, so deliveries per
            # frame shows how well the nodes coalesce their writes.
            p = point_record(rec, w, mon.result, policy, {"ws_closed": dict(transport.ws_closed),
                                                          "ws_frames_read": transport.frames - frames_before,
                                                          "node_metrics": metrics_delta(before, after)})
            if spy is not None:
                profiles.append(finish_py_spy(spy, rate))
            await quiet(transport)
            return p

        result = await drive(run_rate, policy, rates, say, name, groups)
        if profiles:
            result["profiles"] = profiles
        result["layout"] = {"nodes": len(cluster["nodes"]), "users": users or workload.clients, "send_via": send_via,
                            "generator_io": io, "fanout": await fanout_mode(cluster)}
        await transport.aclose()
        nursery.cancel_scope.cancel()
    return result


# -- NATS

def nats_system(workload: Workload, policy: SweepPolicy, rates: list[float] | None, say: Say, work_dir: Path,
                *, fsync: bool = False, servers: int | None = None) -> dict:
    """NATS JetStream through the same client harness: one server, or (`servers`) a JetStream
    cluster of that many servers with the stream replicated on each and the clients spread over
    them like sms's over its nodes."""
    from contextlib import ExitStack

    from .nats_client import NatsTransport, nats_cluster, nats_server, server_pid_groups

    clustered = servers is not None
    name = "nats-cluster" if clustered else "nats-fsync" if fsync else "nats"
    servers = servers or 1
    plan = client_plan(workload, servers)
    with ExitStack() as stack:
        if clustered:
            started = stack.enter_context(nats_cluster(work_dir, servers, say, fsync=fsync))
            urls, pids = started["urls"], started["pids"]
        else:
            started = stack.enter_context(nats_server(work_dir, say, fsync=fsync))
            urls, pids = [started["url"]], [started["pid"]]

        async def main() -> dict:
            transport = NatsTransport(urls, plan, replicas=servers, say=say)
            layout = f"{servers} servers, the stream on each" if servers > 1 else "1 server"
            say(f"{name}: {workload.clients} clients, {workload.senders} senders, {workload.rooms} rooms, {layout}, "
                f"JetStream file storage{' synced at every write' if fsync else ''}, publish waits for the PubAck")
            await transport.setup()
            groups = server_pid_groups(pids)
            shield(groups, say)

            async def run_rate(rate: float, i: int) -> dict:
                w = replace(workload, rate=rate)
                mon = ResourceMonitor(groups)
                rec = await run_point(transport, plan, w, i, run_tag=transport.tag, window=mon.window)
                p = point_record(rec, w, mon.result, policy)
                await quiet(transport)
                return p

            try:
                return await drive(run_rate, policy, rates, say, name, groups)
            finally:
                await transport.aclose()

        result = anyio.run(main, backend="asyncio")
    result["layout"] = {"servers": servers, "replicas": servers, "storage": "file",
                        "sync_interval": "always" if fsync else "default (2 min)"}
    return result


# -- raw GossipSub

async def gossip_system(workload: Workload, policy: SweepPolicy, rates: list[float] | None, say: Say,
                        hosts: int = 3) -> dict:
    from .gossip import GossipCluster

    gc = GossipCluster(hosts, workload.rooms, say)
    say(f"gossipsub: {hosts} hosts (processes), {workload.senders} senders, {workload.rooms} topics; "
        "the generator runs inside the hosts")
    try:
        await trio.to_thread.run_sync(gc.start)
        groups = [Group(f"host-{i}", "node+generator", [pid]) for i, pid in enumerate(gc.pids)]
        groups.append(Group("generator", "generator", [os.getpid()]))
        shield(groups, say)

        async def run_rate(rate: float, i: int) -> dict:
            w = replace(workload, rate=rate, drain_s=min(workload.drain_s, 3.0))
            mon = ResourceMonitor(groups)
            rec = await gc.run_point(w, i, window=mon.window)
            p = point_record(rec, w, mon.result, policy)
            await trio.sleep(1.0)
            return p

        result = await drive(run_rate, policy, rates, say, "gossipsub", groups)
    finally:
        await trio.to_thread.run_sync(gc.stop)
    result["layout"] = {"hosts": hosts, "recipients_per_message": hosts - 1, "generator": "inside the hosts"}
    return result


# -- profiling

def start_py_spy(pid: int, w: Workload, out_dir: Path, stem: str) -> dict:
    import shutil
    import sys

    exe = Path(sys.executable).parent / "py-spy"
    exe_s = str(exe) if exe.exists() else shutil.which("py-spy")
    if not exe_s:
        return {"error": "py-spy not installed (bench extra)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{stem}.txt"
    # Sample the measured window only: start after the warm-up.
    cmd = [exe_s, "record", "--pid", str(pid), "--duration", str(max(1, int(w.duration_s))), "--rate", "100",
           "--format", "raw", "--output", str(raw), "--nonblocking", "--gil"]
    delay = max(0.0, w.warmup_s + 0.2)
    proc = subprocess.Popen(["sh", "-c", f'sleep {delay}; exec "$@"', "sh", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"proc": proc, "raw": raw, "pid": pid}


def finish_py_spy(spy: dict, rate: float) -> dict:
    from .profile import summarize_collapsed

    if "error" in spy:
        return {"rate": rate, "error": spy["error"]}
    proc: subprocess.Popen = spy["proc"]
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    raw: Path = spy["raw"]
    if not raw.exists():
        return {"rate": rate, "error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
    summary = summarize_collapsed(raw.read_text())
    return {"rate": rate, "pid": spy["pid"], "file": str(raw), **summary}


# -- whole runs

def load_cluster(path: Path) -> dict:
    return json.loads(path.read_text())


def with_cluster(cluster_file: Path | None, nodes: int, work_dir: Path, say: Say):
    """A context manager yielding cluster info: the given cluster.json, or a fresh `sms up`."""
    if cluster_file is not None:
        info = load_cluster(cluster_file)

        class _Given:
            def __enter__(self):
                return info

            def __exit__(self, *exc):
                return False

        return _Given()
    return local_cluster(nodes, work_dir, say)


@contextmanager
def scratch_dir(base: Path | None, say: Say) -> Iterator[Path]:
    """Where a run keeps its clusters' data: `base` if given (kept), else a new temporary
    directory, removed when the run ends well (a sweep leaves 0.5-1.5 GB of database, etcd and
    NATS data: 363 runs had filled the disk) and kept, with its path said, when it fails (the
    clusters' logs are in it)."""
    raise_fd_limit()
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        yield base
        return
    path = Path(tempfile.mkdtemp(prefix="sms-bench-"))
    try:
        yield path
    except BaseException:
        say(f"kept {path} (the clusters' data and logs); remove it when done")
        raise
    shutil.rmtree(path, ignore_errors=True)


def workload_config(workload: Workload, policy: SweepPolicy, rates: list[float] | None, **more) -> dict:
    return {"workload": asdict(workload), "policy": asdict(policy), "rates": rates, **more}
