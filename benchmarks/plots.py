"""PNG plots from a result document (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"sms": "tab:blue", "sms-early": "tab:purple", "sms-commit-first": "tab:cyan", "nats": "tab:green", "nats-fsync": "tab:olive", "nats-cluster": "tab:brown", "gossipsub": "tab:orange"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_vs_rate(doc: dict, path: Path, limit_ms: float = 100.0) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, system in doc["systems"].items():
        pts = [p for p in system["points"] if p["delivery_ms"]["p50"] is not None]
        if not pts:
            continue
        rates = [p["offered_rate"] for p in pts]
        color = COLORS.get(name)
        ax.plot(rates, [p["delivery_ms"]["p50"] for p in pts], "o--", color=color, label=f"{name} p50")
        ax.plot(rates, [p["delivery_ms"]["p99"] for p in pts], "s-", color=color, label=f"{name} p99")
        for p in pts:
            if not p["held"]:
                ax.plot([p["offered_rate"]], [p["delivery_ms"]["p99"]], "x", color="red", markersize=10)
    ax.axhline(limit_ms, color="grey", linestyle=":", label=f"{limit_ms:g} ms target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (sends/s, all senders)")
    ax.set_ylabel("send -> delivery latency (ms)")
    w = doc["config"].get("workload", {})
    ax.set_title(f"delivery latency vs offered rate (C={w.get('clients')}, S={w.get('senders')}, "
                 f"K={w.get('rooms')}, B={w.get('body_bytes')} B, T={w.get('duration_s')} s); x = point failed")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def latency_cdf(doc: dict, path: Path) -> Path:
    """CDF of each system's highest held point (or its lowest point if none held); also at the
    highest rate all systems held, when there is one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    held_sets = [{p["offered_rate"] for p in s["points"] if p["held"]} for s in doc["systems"].values()]
    common = max(set.intersection(*held_sets)) if held_sets and set.intersection(*held_sets) else None
    for name, system in doc["systems"].items():
        pts = system["points"]
        if not pts:
            continue
        held = [p for p in pts if p["held"]]
        chosen = {"best": max(held, key=lambda p: p["offered_rate"]) if held else min(pts, key=lambda p: p["offered_rate"])}
        if common is not None:
            chosen["common"] = next(p for p in pts if p["offered_rate"] == common)
        for which, p in chosen.items():
            if not p.get("cdf_ms"):
                continue
            xs = [c[0] for c in p["cdf_ms"]]
            ys = [c[1] for c in p["cdf_ms"]]
            style = "-" if which == "best" else "--"
            ax.plot(xs, ys, style, color=COLORS.get(name),
                    label=f"{name} at {p['offered_rate']:g}/s ({'highest held' if which == 'best' and p['held'] else which if which == 'common' else 'lowest rate'})")
    ax.set_xscale("log")
    ax.set_xlabel("send -> delivery latency (ms)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title("delivery latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def node_scale_plot(doc: dict, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    pts = doc["systems"]["sms"]["points"]
    nodes = [p["nodes"] for p in pts]
    rate = pts[0]["offered_rate"] if pts else None
    a1.plot(nodes, [p["throughput"]["deliveries_per_s"] for p in pts], "o-", label="deliveries/s achieved")
    a1.plot(nodes, [p["expected_deliveries"] / p["duration_s"] for p in pts], "s--", label="deliveries/s owed")
    a1.set_xlabel("nodes")
    a1.set_ylabel("per second")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(nodes, [p["delivery_ms"]["p50"] for p in pts], "o--", label="p50")
    a2.plot(nodes, [p["delivery_ms"]["p99"] for p in pts], "s-", label="p99")
    a2.axhline(100, color="grey", linestyle=":", label="100 ms")
    a2.set_yscale("log")
    a2.set_xlabel("nodes")
    a2.set_ylabel("send -> delivery latency (ms)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3, which="both")
    a3.plot(nodes, [p["cpu_ms_per_delivery"] for p in pts], "o-", color="tab:red")
    a3.set_xlabel("nodes")
    a3.set_ylabel("system CPU ms per delivered message")
    a3.grid(alpha=0.3)
    fig.suptitle(f"sms node scale at {rate:g} sends/s offered (all processes on one 2-core machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
