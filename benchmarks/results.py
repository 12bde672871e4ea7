"""The result document: what was run, on what, and what came out. `validate_result` is the schema
(checked by the unit tests and before every write), `environment()` gathers machine, versions and git
commit (the only impure part here, kept small)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

SCHEMA = "sms-bench/1"
KINDS = ("point", "sweep", "conn-scale", "node-scale")
SYSTEMS = ("sms", "nats", "gossipsub")

POINT_KEYS = {
    "offered_rate": (int, float),
    "duration_s": (int, float),
    "scheduled": int,
    "sent": int,
    "acked": int,
    "send_errors": int,
    "not_sent": int,
    "expected_deliveries": int,
    "delivered": int,
    "lost": int,
    "loss_ratio": (int, float),
    "duplicates": int,
    "delivery_ms": dict,
    "ack_ms": dict,
    "lag_ms": dict,
    "throughput": dict,
    "resources": dict,
    "held": bool,
    "reasons": list,
}
LATENCY_KEYS = ("count", "p50", "p95", "p99", "max", "mean")
RESOURCE_KEYS = ("cpu_s", "cpu_percent", "rss_mb", "peak_rss_mb", "role")


class SchemaError(ValueError):
    pass


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: {what}")


def validate_point(point: dict, where: str = "point") -> None:
    for key, typ in POINT_KEYS.items():
        _check(key in point, where, f"missing {key!r}")
        _check(isinstance(point[key], typ) and not (typ is int and isinstance(point[key], bool)),
               where, f"{key!r} has type {type(point[key]).__name__}")
    for key in ("delivery_ms", "ack_ms", "lag_ms"):
        for k in LATENCY_KEYS:
            _check(k in point[key], where, f"{key}.{k} missing")
    _check(point["lost"] == point["expected_deliveries"] - point["delivered"], where, "lost != expected - delivered")
    _check(point["lost"] >= 0 and point["duplicates"] >= 0, where, "negative counts")
    for name, res in point["resources"].items():
        for k in RESOURCE_KEYS:
            _check(k in res, where, f"resources[{name!r}].{k} missing")


def validate_result(doc: dict) -> dict:
    """Raises SchemaError unless `doc` is a well-formed result document; returns it."""
    _check(doc.get("schema") == SCHEMA, "doc", f"schema must be {SCHEMA!r}")
    _check(doc.get("kind") in KINDS, "doc", f"kind must be one of {KINDS}")
    for key in ("created", "machine", "versions", "git", "config", "systems"):
        _check(key in doc, "doc", f"missing {key!r}")
    _check(isinstance(doc["systems"], dict) and doc["systems"], "doc", "systems must be a non-empty object")
    for name, system in doc["systems"].items():
        where = f"systems[{name!r}]"
        _check(isinstance(system.get("points"), list), where, "points must be a list")
        for i, point in enumerate(system["points"]):
            validate_point(point, f"{where}.points[{i}]")
        if doc["kind"] == "sweep":
            _check("max_sustained_rate" in system, where, "a sweep names its max_sustained_rate")
            best = system["max_sustained_rate"]
            held = [p["offered_rate"] for p in system["points"] if p["held"]]
            _check(best == (max(held) if held else None), where, "max_sustained_rate is not the best held rate")
    return doc


def result_doc(kind: str, config: dict, systems: dict, env: dict | None = None, notes: list[str] | None = None) -> dict:
    env = env if env is not None else environment()
    doc = {
        "schema": SCHEMA,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": env["machine"],
        "versions": env["versions"],
        "git": env["git"],
        "config": config,
        "systems": systems,
        "notes": notes or [],
    }
    return validate_result(doc)


def write_result(doc: dict, out_dir: Path, stem: str) -> Path:
    validate_result(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


# -- environment (impure)

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(repo: Path | None = None) -> dict:
    import psutil

    repo = repo or Path(__file__).resolve().parent.parent
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nats_server = _run([str(Path(os.sys.executable).parent / "nats-server"), "--version"])
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_model": cpu_model,
            "logical_cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "nice": os.nice(0),  # `nice -n -10 sms bench` shields the run from other processes' load
        },
        "versions": {
            "sms": _version("sms"),
            "libp2p": _version("libp2p"),
            "trio": _version("trio"),
            "hypercorn": _version("hypercorn"),
            "fastapi": _version("fastapi"),
            "psycopg": _version("psycopg"),
            "nats-py": _version("nats-py"),
            "nats-server": nats_server,
            "trio-websocket": _version("trio-websocket"),
        },
        "git": {
            "commit": _run(["git", "rev-parse", "HEAD"], repo),
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo),
            "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], repo)),
        },
    }
