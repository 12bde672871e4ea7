"""Pure: summarize py-spy's collapsed ("raw") output into where a node's CPU goes.

Each input line is `frame;frame;...;leaf COUNT` with frames like `func (path/to/file.py:123)`.
Self time goes to the leaf frame; each sample is also attributed once to every *component* on its
stack (inclusive), where a component is the package a frame's file belongs to (libp2p, hypercorn,
starlette, psycopg, trio, ...) or our own folders (sms.node.adapters, sms.node.core, sms.crdt).
"""

from __future__ import annotations

import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
_OURS = ("node/adapters/", "node/core/", "node/", "crdt/", "benchmarks/", "bootstrap/", "cli/")


def component(path: str) -> str:
    """The package (or our folder) a source file belongs to."""
    if "site-packages/" in path or "dist-packages/" in path:
        rest = path.split("-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    p = "/" + path
    for folder in _OURS:
        if f"/{folder}" in p:
            return "sms." + folder.strip("/").replace("/", ".")
    if "/lib/python3" in path or path.startswith("<frozen"):
        return "stdlib"
    return "other"


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one collapsed frame."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def summarize_collapsed(text: str, top: int = 15) -> dict:
    total = 0
    self_fn: Counter[str] = Counter()
    self_comp: Counter[str] = Counter()
    incl_comp: Counter[str] = Counter()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit() or not stack:
            continue
        count = int(count_s)
        frames = [parse_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        func, path = frames[-1]
        short = path.rsplit("-packages/", 1)[-1] if path else ""
        self_fn[f"{func} ({short})"] += count
        self_comp[component(path)] += count
        for comp in {component(p) for _, p in frames}:
            incl_comp[comp] += count

    def pct(counter: Counter[str]) -> list[list]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_component_pct": pct(self_comp),
        "inclusive_by_component_pct": pct(incl_comp),
        "self_by_function_pct": pct(self_fn),
    }
