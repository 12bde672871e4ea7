"""`sms bench`: registered on the main app.

    sms bench sweep         raise the offered rate until p99 > 100 ms or loss; sms and baselines
    sms bench run           fixed rates (--rate, repeatable; --repeat N runs it all N times)
    sms bench ratio FILE..  sms p99 / a baseline's across repeated runs (median, spread)
    sms bench conn-scale    many WebSocket connections, a few percent chatting
    sms bench node-scale    1, 3, 5, 10 nodes at one rate
    sms bench plot FILE     PNGs from a result file
    sms bench report FILE   markdown tables from a result file

Each writes benchmarks/results/<kind>-<time>.json (machine, versions, git commit, config, points)
and PNGs beside it. Every loop is bounded; see docs/benchmarks.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("nats", "nats-fsync", "nats-cluster", "gossipsub", "sms-commit-first")
# Sends the generator keeps waiting for their acks at most: a bound on its memory, set where the
# system measured, not the bound, stops a sweep. It was 512; once sms spaced its commits up to 16 ms
# apart under early fan-out, its acks at 6,400 sends/s took ~50 ms at p99 and 512 stopped sweeps
# that held every other criterion (8,000 sends/s: p99 47.6 ms, nothing lost, 3,935 sends not
# started); with 4,096 the same code held 12,500 (docs/benchmarks.md, "Latest").
MAX_IN_FLIGHT = 4096
MAX_IN_FLIGHT_HELP = "Sends awaiting acks at most; a due send beyond it is counted as not sent."


def _say(line: str) -> None:
    typer.echo(line)


def register(app: typer.Typer) -> None:
    """Adds the `bench` command group to `app`."""
    bench = typer.Typer(help="Benchmarks: delivery latency, loss and throughput of sms against NATS "
                             "JetStream and raw GossipSub. See docs/benchmarks.md.", no_args_is_help=True)
    app.add_typer(bench, name="bench")

    common = dict(
        cluster=typer.Option(None, "--cluster", help="Use this running cluster (DIR/cluster.json) instead of a fresh `sms up`."),
        send_via=typer.Option("ws", "--send-via", help="How sms clients send: ws (a \"send\" frame on their events "
                                                        "WebSocket, answered by an ack event) or http (PUT)."),
    )

    @bench.command("sweep")
    def sweep_cmd(
        cluster: Optional[Path] = common["cluster"],
        nodes: int = typer.Option(3, min=1, max=20, help="Nodes of the fresh cluster."),
        clients: int = typer.Option(30, min=2, help="C: WebSocket clients, spread over the nodes."),
        senders: int = typer.Option(6, min=1, help="S: how many clients send."),
        rooms: int = typer.Option(3, min=1, help="K: rooms (client i is in room i % K)."),
        body_bytes: int = typer.Option(200, min=32, max=60000, help="B: message body size."),
        duration: float = typer.Option(10.0, min=1, max=600, help="T: measured seconds per point."),
        warmup: float = typer.Option(2.0, min=0, max=120, help="Warm-up seconds per point (not measured)."),
        drain: float = typer.Option(5.0, min=0, max=60, help="Max seconds to wait for stragglers."),
        start_rate: float = typer.Option(25.0, min=0.1, help="First offered rate (sends/s)."),
        factor: float = typer.Option(2.0, min=1.05, help="Rate multiplier while points hold."),
        max_rate: float = typer.Option(20000.0, help="Never offer more than this."),
        max_points: int = typer.Option(8, min=1, max=50, help="Points per system at most."),
        refine: int = typer.Option(1, min=0, max=5, help="Bisection points after the first failure."),
        max_in_flight: int = typer.Option(MAX_IN_FLIGHT, min=1, help=MAX_IN_FLIGHT_HELP),
        baselines: str = typer.Option("nats,nats-fsync,gossipsub,sms-commit-first", help="Comma list from: nats, nats-fsync (JetStream syncing every write, as sms commits every message), nats-cluster (a JetStream cluster of as many servers as sms has nodes, the stream replicated on each), gossipsub, sms-commit-first (sms on a second fresh cluster whose nodes run --commit-first: nothing delivered before its commit) ('' for none)."),
        profile: bool = typer.Option(False, help="py-spy node 0 during every sms point (raw stacks + summary)."),
        retries: int = typer.Option(1, min=0, max=5, help="Repeat a point disturbed by other processes' CPU this often."),
        quiet_wait: float = typer.Option(30.0, min=0, max=600, help="Wait up to this long for a quiet machine before a point."),
        send_via: str = common["send_via"],
        out: Path = typer.Option(RESULTS, help="Where result JSON and PNGs go."),
        work_dir: Optional[Path] = typer.Option(None, help="Scratch dir for clusters, kept (default: a new temp dir, "
                                                           "removed after a run that ends well)."),
    ) -> None:
        """Raise the offered rate until p99 > 100 ms or loss appears, for sms and the baselines."""
        from .schedule import Workload
        from .sweep import SweepPolicy

        w = Workload(clients=clients, senders=senders, rooms=rooms, body_bytes=body_bytes, duration_s=duration,
                     warmup_s=warmup, drain_s=drain, max_in_flight=max_in_flight, rate=start_rate).validate()
        policy = SweepPolicy(start_rate=start_rate, factor=factor, max_rate=max_rate, max_points=max_points,
                             refine=refine).validate()
        _set_patience(retries, quiet_wait)
        _run_load("sweep", cluster, nodes, w, policy, None, baselines, profile, out, work_dir, send_via)

    @bench.command("run")
    def run_cmd(
        cluster: Optional[Path] = common["cluster"],
        nodes: int = typer.Option(3, min=1, max=20),
        rate: List[float] = typer.Option([100.0], "--rate", "-r", help="Offered rate (sends/s); repeatable."),
        clients: int = typer.Option(30, min=2),
        senders: int = typer.Option(6, min=1),
        rooms: int = typer.Option(3, min=1),
        body_bytes: int = typer.Option(200, min=32, max=60000),
        duration: float = typer.Option(10.0, min=1, max=600),
        warmup: float = typer.Option(2.0, min=0, max=120),
        drain: float = typer.Option(5.0, min=0, max=60),
        max_in_flight: int = typer.Option(MAX_IN_FLIGHT, min=1, help=MAX_IN_FLIGHT_HELP),
        baselines: str = typer.Option("", help="Comma list from: nats, nats-fsync, nats-cluster (one NATS server per sms node, the stream replicated on each), gossipsub, sms-commit-first (a second cluster with --commit-first)."),
        profile: bool = typer.Option(False, help="py-spy node 0 during each sms point."),
        retries: int = typer.Option(1, min=0, max=5, help="Repeat a point disturbed by other processes' CPU this often."),
        quiet_wait: float = typer.Option(30.0, min=0, max=600, help="Wait up to this long for a quiet machine before a point."),
        send_via: str = common["send_via"],
        repeat: int = typer.Option(1, min=1, max=20, help="Run everything this many times (fresh clusters each "
                                                          "time, sms then the baselines), one result file each, "
                                                          "then print p99 ratios over the runs (median, spread)."),
        out: Path = typer.Option(RESULTS),
        work_dir: Optional[Path] = typer.Option(None),
    ) -> None:
        """Fixed offered rates against sms (and optionally the baselines)."""
        _set_patience(retries, quiet_wait)
        from .schedule import Workload
        from .sweep import SweepPolicy

        w = Workload(clients=clients, senders=senders, rooms=rooms, body_bytes=body_bytes, duration_s=duration,
                     warmup_s=warmup, drain_s=drain, max_in_flight=max_in_flight, rate=rate[0]).validate()
        docs = []
        for i in range(repeat):
            if repeat > 1:
                _say(f"== run {i + 1} of {repeat}")
            docs.append(_run_load("point", cluster, nodes, w, SweepPolicy(start_rate=min(rate), max_rate=max(rate)),
                                  list(rate), baselines, profile, out, work_dir, send_via,
                                  suffix=f"-{i + 1}of{repeat}" if repeat > 1 else ""))
        if repeat > 1:
            _say_ratios(docs)

    @bench.command("ratio")
    def ratio_cmd(
        results: List[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                             help="Result JSON files of runs that measured both systems."),
        baseline: str = typer.Option("nats", help="The system to divide by: nats, nats-fsync, nats-cluster, sms-commit-first."),
        system: str = typer.Option("sms", help="The system to divide."),
        target: float = typer.Option(2.0, min=0.01, help="Count the runs whose ratio is at most this."),
    ) -> None:
        """sms p99 / a baseline's p99 per offered rate across repeated runs: median, lowest, highest,
        and how many runs were within the target (the issue's is 2×)."""
        import json

        from .report import ratios_table
        from .results import SchemaError, validate_result

        docs = []
        for path in results:
            try:
                docs.append(validate_result(json.loads(path.read_text())))
            except (ValueError, SchemaError) as err:
                raise typer.BadParameter(f"{path} is not a result file ({err})") from None
        table = ratios_table(docs, baseline, system, target)
        if not table:
            raise typer.BadParameter(f"no file measured both {system} and {baseline} at the same rate; "
                                     f"run `sms bench run --baselines {baseline} --repeat N`")
        typer.echo(table)

    @bench.command("conn-scale")
    def conn_scale_cmd(
        cluster: Optional[Path] = common["cluster"],
        nodes: int = typer.Option(3, min=1, max=20),
        connections: int = typer.Option(10000, min=2, max=50000, help="WebSocket connections in all."),
        users: int = typer.Option(200, min=1, help="Accounts they log in as (registering 10,000 argon2id users "
                                                    "would take ~30 min here); must be a multiple of --rooms."),
        rooms: int = typer.Option(50, min=1),
        chatting: float = typer.Option(0.01, min=0.0001, max=1.0, help="Fraction of connections that send."),
        rate: float = typer.Option(20.0, help="Offered sends/s of all chatting connections together."),
        duration: float = typer.Option(10.0, min=1, max=600),
        warmup: float = typer.Option(2.0, min=0, max=120),
        out: Path = typer.Option(RESULTS),
        work_dir: Optional[Path] = typer.Option(None),
    ) -> None:
        """Hold many WebSockets across the nodes; report memory per connection and p99."""
        from .scale import conn_scale

        conn_scale(cluster, nodes, connections, users, rooms, chatting, rate, duration, warmup, out, work_dir, _say)

    @bench.command("node-scale")
    def node_scale_cmd(
        node_counts: str = typer.Option("1,3,5,10", "--nodes", help="Cluster sizes to try, comma separated."),
        rate: float = typer.Option(100.0, help="Offered sends/s at every size."),
        clients: int = typer.Option(30, min=2),
        senders: int = typer.Option(6, min=1),
        rooms: int = typer.Option(3, min=1),
        duration: float = typer.Option(10.0, min=1, max=600),
        warmup: float = typer.Option(2.0, min=0, max=120),
        out: Path = typer.Option(RESULTS),
        work_dir: Optional[Path] = typer.Option(None),
    ) -> None:
        """Fresh clusters of 1, 3, 5, 10 nodes at one rate: throughput and CPU per delivered message."""
        from .scale import node_scale

        counts = [int(x) for x in node_counts.split(",") if x.strip()]
        node_scale(counts, rate, clients, senders, rooms, duration, warmup, out, work_dir, _say)

    @bench.command("report")
    def report_cmd(result: Path = typer.Argument(..., exists=True, help="A result JSON file.")) -> None:
        """Print a result file as markdown tables (as in docs/benchmarks.md)."""
        import json

        from .report import render

        typer.echo(render(json.loads(result.read_text())))

    @bench.command("plot")
    def plot_cmd(result: Path = typer.Argument(..., exists=True, help="A result JSON file.")) -> None:
        """(Re)draw the PNGs of a result file next to it."""
        import json

        for p in make_plots(json.loads(result.read_text()), result.parent, result.stem):
            typer.echo(f"wrote {p}")


def _say_ratios(docs: list[dict]) -> None:
    from .report import ratios_table

    for baseline in ("nats", "nats-fsync", "nats-cluster", "sms-commit-first"):
        table = ratios_table(docs, baseline)
        if table:
            _say(f"\nsms p99 / {baseline} p99 over {len(docs)} runs:\n{table}")


def _set_patience(retries: int, quiet_wait: float) -> None:
    from . import runner

    runner.RETRIES, runner.QUIET_WAIT_S = retries, quiet_wait


def make_plots(doc: dict, out: Path, stem: str) -> list[Path]:
    from . import plots

    if doc["kind"] == "node-scale":
        return [plots.node_scale_plot(doc, out / f"{stem}-nodes.png")]
    return [plots.latency_vs_rate(doc, out / f"{stem}-latency.png"), plots.latency_cdf(doc, out / f"{stem}-cdf.png")]


def _run_load(kind, cluster_file, nodes, w, policy, rates, baselines, profile, out, work_dir, send_via="ws",
              suffix: str = "") -> dict:
    """Runs sms and the wanted baselines, writes the result file (and plots); returns the result."""
    import trio

    from .results import result_doc, write_result
    from .cluster import local_cluster
    from .runner import gossip_system, nats_system, scratch_dir, sms_system, with_cluster, workload_config
    from .sms_client import SEND_VIA

    if send_via not in SEND_VIA:
        raise typer.BadParameter(f"--send-via must be one of {', '.join(SEND_VIA)}")

    wanted = [b.strip() for b in baselines.split(",") if b.strip()]
    bad = [b for b in wanted if b not in BASELINES]
    if bad:
        raise typer.BadParameter(f"unknown baseline(s) {bad}; use {', '.join(BASELINES)}")
    stem = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    systems: dict = {}
    notes: list[str] = []
    t0 = time.monotonic()
    with scratch_dir(work_dir, _say) as wd:
        with with_cluster(cluster_file, nodes, wd, _say) as cluster:
            prof = {"rate": None, "dir": out / f"{stem}-profiles"} if profile else None
            systems["sms"] = trio.run(sms_system, cluster, w, policy, rates, _say, None, prof, send_via)
            n_nodes = len(cluster["nodes"])
        if "sms-commit-first" in wanted:
            with local_cluster(n_nodes, wd, _say, env={"SMS_EARLY_FANOUT": "0"}) as strict:
                systems["sms-commit-first"] = trio.run(sms_system, strict, w, policy, rates, _say, None, None,
                                                       send_via, "sms-commit-first")
        if "nats" in wanted:
            systems["nats"] = nats_system(w, policy, rates, _say, wd)
        if "nats-fsync" in wanted:
            systems["nats-fsync"] = nats_system(w, policy, rates, _say, wd, fsync=True)
        if "nats-cluster" in wanted and n_nodes < 2:
            notes.append("nats-cluster skipped: it runs one NATS server per sms node, and sms ran one node")
            _say(notes[-1])
        elif "nats-cluster" in wanted:
            systems["nats-cluster"] = nats_system(w, policy, rates, _say, wd, servers=n_nodes)
        if "gossipsub" in wanted:
            systems["gossipsub"] = trio.run(gossip_system, w, policy, rates, _say)
    from . import runner

    config = workload_config(w, policy, rates, nodes=n_nodes, baselines=wanted,
                             sms_client={"send_via": send_via, "events": "batch=1"},
                             interference={"disturbed_above_percent": runner.DISTURBED_PERCENT,
                                           "retries": runner.RETRIES, "quiet_wait_s": runner.QUIET_WAIT_S},
                             cluster="given" if cluster_file else "fresh sms up", wall_s=round(time.monotonic() - t0, 1))
    doc = result_doc(kind, config, systems, notes=notes)
    path = write_result(doc, out, stem)
    _say(f"wrote {path}")
    try:
        for p in make_plots(doc, out, stem):
            _say(f"wrote {p}")
    except ImportError:
        _say("plots skipped: matplotlib is not installed (./dev install '[bench]'); "
             f"`sms bench plot {path}` draws them later")
    for name, s in systems.items():
        _say(f"{name}: highest rate that held = {s['max_sustained_rate']} sends/s ({s['stop_reason']})")
    return doc
