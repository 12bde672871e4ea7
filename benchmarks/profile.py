"""Pure: summarize py-spy's collapsed ("raw") output into where a node's CPU goes.

Each input line is `frame;frame;...;leaf COUNT` with frames like `func (path/to/file.py:123)`.
Self time goes to the leaf frame; each sample is also attributed once to every *component* on its
stack (inclusive), where a component is the package a frame's file belongs to (libp2p, hypercorn,
starlette, psycopg, trio, ...) or our own folders (sms.node.adapters, sms.node.core, sms.crdt).
`by_entry_component` gives each sample to the first component from the root that is not a mere
carrier (trio's run loop, the CLI, the stdlib): hypercorn = serving HTTP/WebSocket, libp2p = the
host's own tasks, sms.node = our runtime tasks, psycopg = database threads.
"""

from __future__ import annotations

import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
_OURS = ("node/adapters/", "node/core/", "node/", "crdt/", "benchmarks/", "bootstrap/", "cli/")


def component(path: str) -> str:
    """The package (or our folder) a source file belongs to. py-spy prints paths relative to the
    sys.path entry they were found under (`trio/_core/_run.py`, `node/adapters/p2p.py`)."""
    if path.startswith("<frozen") or not path:
        return "stdlib"
    if "site-packages/" in path or "dist-packages/" in path:
        path = path.split("-packages/", 1)[1]
    elif path.startswith("/"):
        p = path
        for folder in _OURS:
            if f"/{folder}" in p:
                return "sms." + folder.strip("/").replace("/", ".")
        return "stdlib" if "/lib/python3" in path else "other"
    for folder in _OURS:
        if path.startswith(folder):
            return "sms." + folder.strip("/").replace("/", ".")
    if "/" not in path:
        return "stdlib"  # a top-level module: threading.py, contextlib.py, ...
    return path.split("/", 1)[0]


# Frames that only carry the work of others: the first frame from the root that is none of these
# names the task family a sample belongs to.
_LOOPS = {"unrolled_run", "WorkerThread._work", "Runner.reschedule"}
_CARRIERS = {"stdlib", "sms.cli", "typer", "click", "trio", "outcome", "anyio", "sniffio", "other"}


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
    entry: Counter[str] = Counter()
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
        comps = [component(p) for _, p in frames]
        for comp in set(comps):
            incl_comp[comp] += count
        # Start after the last frame of trio's scheduler or thread cache: what it runs is the entry.
        start = max((i + 1 for i, (fn, _) in enumerate(frames) if comps[i] == "trio" and fn in _LOOPS), default=0)
        first = next((i for i in range(start, len(comps)) if comps[i] not in _CARRIERS), None)
        if first is None:
            entry["trio/stdlib only"] += count
        elif comps[first].startswith("sms."):
            entry[f"{comps[first]}:{frames[first][0]}"] += count  # which of our tasks
        else:
            entry[comps[first]] += count

    def pct(counter: Counter[str]) -> list[list]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_component_pct": pct(self_comp),
        "inclusive_by_component_pct": pct(incl_comp),
        "self_by_function_pct": pct(self_fn),
        "by_entry_component_pct": pct(entry),
    }
