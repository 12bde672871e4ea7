"""Pure: markdown tables from result documents (what docs/benchmarks.md and the README show)."""

from __future__ import annotations

from statistics import median


def _f(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def points_table(doc: dict) -> str:
    """One row per system and offered rate."""
    rows = [
        "| system | offered/s | p50 ms | p95 ms | p99 ms | max ms | ack p99 ms | lost | dup | deliveries/s | "
        "system CPU ms/delivery | generator CPU % | other CPU % | run-queue wait % | held |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, system in doc["systems"].items():
        for p in system["points"]:
            d = p["delivery_ms"]
            flags = []
            if p.get("generator_lagged"):
                flags.append("gen lagged")
            if p.get("disturbed"):
                flags.append("disturbed")
            held = ("yes" if p["held"] else "no") + (f" ({', '.join(flags)})" if flags else "")
            rows.append(
                f"| {name} | {_f(p['offered_rate'], 0) if float(p['offered_rate']).is_integer() else _f(p['offered_rate'], 2)} "
                f"| {_f(d['p50'])} | {_f(d['p95'])} | {_f(d['p99'])} | {_f(d['max'])} | {_f(p['ack_ms']['p99'])} "
                f"| {p['lost']}/{p['expected_deliveries']} | {p['duplicates']} | {_f(p['throughput']['deliveries_per_s'], 0)} "
                f"| {_f(p.get('cpu_ms_per_delivery'), 2)} | {_f(p.get('generator_cpu_percent'))} "
                f"| {_f(p.get('other_cpu_percent'))} | {_f(p.get('runqueue_wait_percent'))} | {held} |"
            )
    return "\n".join(rows)


def summary_table(doc: dict) -> str:
    """Highest rate that held per system, and p99 against NATS at the rates both were measured at."""
    rows = ["| system | highest offered rate that held (sends/s) | deliveries/s there | p99 there (ms) | stop reason |",
            "|---|---:|---:|---:|---|"]
    for name, system in doc["systems"].items():
        best = system.get("max_sustained_rate")
        p = next((q for q in system["points"] if q["offered_rate"] == best), None)
        fanout = (system.get("layout") or {}).get("fanout")  # older results do not say
        label = f"{name} ({fanout})" if fanout else name
        rows.append(f"| {label} | {_f(best, 2) if best is not None else 'none'} | "
                    f"{_f(p['throughput']['deliveries_per_s'], 0) if p else '-'} | {_f(p['delivery_ms']['p99']) if p else '-'} | "
                    f"{system.get('stop_reason', '-')} |")
    return "\n".join(rows)


def versus_nats(doc: dict, baseline: str = "nats", system: str = "sms") -> list[tuple[float, float, float, float]]:
    """(rate, sms p99, the baseline's p99, ratio) at every rate both systems were measured at."""
    systems = doc["systems"]
    if system not in systems or baseline not in systems:
        return []
    nats = {p["offered_rate"]: p for p in systems[baseline]["points"]}
    out = []
    for p in systems[system]["points"]:
        q = nats.get(p["offered_rate"])
        if q and p["delivery_ms"]["p99"] is not None and q["delivery_ms"]["p99"]:
            out.append((p["offered_rate"], p["delivery_ms"]["p99"], q["delivery_ms"]["p99"],
                        round(p["delivery_ms"]["p99"] / q["delivery_ms"]["p99"], 2)))
    return out


def ratios_over_runs(docs: list[dict], baseline: str = "nats", system: str = "sms",
                     target: float = 2.0) -> list[dict]:
    """Per offered rate, `system`'s p99 over `baseline`'s across repeated runs (each document one
    run that measured both): how many runs, the median, lowest and highest ratio, and in how many
    the ratio was within `target`. One run's p99 moves with the machine's spells; the spread over
    runs says how far to trust it."""
    by_rate: dict[float, list[float]] = {}
    for doc in docs:
        for rate, _, _, ratio in versus_nats(doc, baseline, system):
            by_rate.setdefault(rate, []).append(ratio)
    return [{"rate": rate, "runs": len(r), "median": round(median(r), 2), "low": min(r), "high": max(r),
             "within": sum(1 for x in r if x <= target)}
            for rate, r in sorted(by_rate.items())]


def ratios_table(docs: list[dict], baseline: str = "nats", system: str = "sms", target: float = 2.0) -> str:
    """ratios_over_runs as markdown ('' when no document measured both systems)."""
    rows = ratios_over_runs(docs, baseline, system, target)
    if not rows:
        return ""
    out = [f"| offered/s | runs | median {system} / {baseline} p99 | lowest | highest | within {_f(target, 1)}× |",
           "|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {_f(r['rate'], 0) if float(r['rate']).is_integer() else _f(r['rate'], 2)} | {r['runs']} "
            f"| {_f(r['median'], 2)} | {_f(r['low'], 2)} | {_f(r['high'], 2)} | {r['within']} of {r['runs']} |"
            for r in rows]
    return "\n".join(out)


def resources_table(doc: dict, system: str = "sms") -> str:
    rows = ["| offered/s | " + " | ".join(_res_names(doc, system)) + " |",
            "|---:|" + "---:|" * len(_res_names(doc, system))]
    for p in doc["systems"][system]["points"]:
        cells = []
        for n in _res_names(doc, system):
            r = p["resources"].get(n)
            cells.append(f"{_f(r['cpu_percent'])}% / {_f(r['rss_mb'], 0)} MB" if r else "-")
        rows.append(f"| {_f(p['offered_rate'], 2)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _res_names(doc: dict, system: str) -> list[str]:
    names: list[str] = []
    for p in doc["systems"][system]["points"]:
        for n in p["resources"]:
            if n not in names and n != "machine":
                names.append(n)
    return names


def render(doc: dict) -> str:
    parts = [f"result {doc['kind']} of {doc['created']} (git {str(doc['git'].get('commit'))[:10]}"
             f"{', dirty' if doc['git'].get('dirty') else ''})", "", summary_table(doc), "", points_table(doc)]
    for system in ("sms", "sms-commit-first", "sms-early"):  # sms-early: results from before it was the default
        for baseline, title in (("nats", "NATS"), ("nats-fsync", "NATS, fsync per write"),
                                ("nats-cluster", "NATS cluster")):
            vs = versus_nats(doc, baseline, system)
            if vs:
                parts += ["", f"| offered/s | {system} p99 ms | {title} p99 ms | {system} / {title} |",
                          "|---:|---:|---:|---:|"]
                parts += [f"| {_f(r, 2)} | {_f(a)} | {_f(b)} | {_f(x, 2)} |" for r, a, b, x in vs]
    if "sms" in doc["systems"]:
        parts += ["", "sms processes (CPU % of one core / RSS):", "", resources_table(doc, "sms")]
    return "\n".join(parts)
