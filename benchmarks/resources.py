"""CPU and memory of the processes under test, the load generator and the rest of the machine,
sampled with psutil over a measured window."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import anyio
import psutil


@dataclass
class Group:
    name: str
    role: str                 # "node", "etcd", "postgres", "nats-server", "generator", ...
    pids: list[int]
    children: bool = False    # include every descendant (postgres forks a backend per connection)


def _procs(group: Group) -> list[psutil.Process]:
    out = []
    for pid in group.pids:
        try:
            p = psutil.Process(pid)
            out.append(p)
            if group.children:
                out.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    return out


def _runqueue_wait_s(proc: psutil.Process) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat,
    second field): the direct measure of CPU contention, whoever caused it."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        pass
    return total / 1e9


def _wait(group: Group) -> float:
    return sum(_runqueue_wait_s(p) for p in _procs(group))


def _sample(group: Group) -> tuple[float, float]:
    """(cpu seconds user+system, rss bytes) summed over the group."""
    cpu = rss = 0.0
    for p in _procs(group):
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
        except psutil.Error:
            pass
    return cpu, rss


@dataclass
class ResourceMonitor:
    groups: list[Group]
    interval_s: float = 0.5
    result: dict = field(default_factory=dict)

    async def window(self, t0: float, t1: float) -> None:
        """Samples from monotonic time t0 to t1; leaves the summary in `result`."""
        now = time.monotonic()
        if t0 > now:
            await anyio.sleep(t0 - now)
        start = {g.name: _sample(g) for g in self.groups}
        wait0 = {g.name: _wait(g) for g in self.groups}
        sys0 = psutil.cpu_times()
        w0 = time.monotonic()
        peak = {name: rss for name, (_, rss) in start.items()}
        while time.monotonic() < t1:
            await anyio.sleep(min(self.interval_s, max(0.0, t1 - time.monotonic())))
            for g in self.groups:
                _, rss = _sample(g)
                peak[g.name] = max(peak[g.name], rss)
        end = {g.name: _sample(g) for g in self.groups}
        wait1 = {g.name: _wait(g) for g in self.groups}
        sys1 = psutil.cpu_times()
        wall = max(1e-6, time.monotonic() - w0)
        out = {}
        for g in self.groups:
            cpu = end[g.name][0] - start[g.name][0]
            out[g.name] = {
                "role": g.role,
                "pids": list(g.pids),
                "cpu_s": round(cpu, 3),
                "cpu_percent": round(100 * cpu / wall, 1),
                "rss_mb": round(end[g.name][1] / 2**20, 1),
                "peak_rss_mb": round(peak[g.name] / 2**20, 1),
                # percent of the window the group's threads spent runnable but without a CPU
                "runqueue_wait_percent": round(100 * max(0.0, wait1[g.name] - wait0[g.name]) / wall, 1),
            }
        total_busy = _busy(sys1) - _busy(sys0)
        ours = sum(v["cpu_s"] for v in out.values())
        out["machine"] = {
            "role": "machine",
            "pids": [],
            "cpu_s": round(total_busy, 3),
            "cpu_percent": round(100 * total_busy / wall, 1),
            "rss_mb": round((psutil.virtual_memory().total - psutil.virtual_memory().available) / 2**20, 1),
            "peak_rss_mb": 0.0,
            "cores": psutil.cpu_count(),
            "other_cpu_percent": round(100 * max(0.0, total_busy - ours) / wall, 1),
        }
        self.result = out


def cluster_groups(cluster: dict) -> list[Group]:
    """Node processes from cluster.json, plus the etcd and PostgreSQL that `sms up` started (found
    among the children of the nodes' parent), plus this process as the generator."""
    groups = [Group(n["name"], "node", [n["pid"]]) for n in cluster["nodes"] if n.get("pid")]
    parents = set()
    for n in cluster["nodes"]:
        try:
            parents.add(psutil.Process(n["pid"]).ppid())
        except psutil.Error:
            pass
    etcd, pg = [], []
    for ppid in parents:
        try:
            for child in psutil.Process(ppid).children():
                name = child.name()
                if name.startswith("etcd"):
                    etcd.append(child.pid)
                elif name.startswith("postgres"):
                    pg.append(child.pid)
        except psutil.Error:
            pass
    if etcd:
        groups.append(Group("etcd", "etcd", etcd))
    if pg:
        groups.append(Group("postgres", "postgres", pg, children=True))
    groups.append(Group("generator", "generator", [os.getpid()]))
    return groups


def _busy(t) -> float:
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0)


async def other_cpu_percent(groups: list[Group], seconds: float = 1.0) -> float:
    """CPU used over `seconds` by processes outside `groups`, in percent of one core."""
    ours0 = sum(_sample(g)[0] for g in groups)
    sys0 = psutil.cpu_times()
    t0 = time.monotonic()
    await anyio.sleep(seconds)
    ours1 = sum(_sample(g)[0] for g in groups)
    sys1 = psutil.cpu_times()
    wall = max(1e-6, time.monotonic() - t0)
    return round(100 * max(0.0, (_busy(sys1) - _busy(sys0)) - (ours1 - ours0)) / wall, 1)


async def wait_for_quiet(groups: list[Group], limit_percent: float, max_wait_s: float, say=None) -> float:
    """Wait (at most max_wait_s) until processes outside `groups` use at most limit_percent of a
    core; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    told = False
    while True:
        other = await other_cpu_percent(groups)
        if other <= limit_percent or time.monotonic() >= deadline:
            return other
        if say and not told:
            say(f"  waiting for a quieter machine: other processes use {other:.0f}% CPU (limit {limit_percent:.0f}%)")
            told = True


def shield(groups: list[Group], say=None) -> list[int]:
    """When this process runs at a raised priority (`nice -n -10 sms bench`, as root), give the
    processes we started the same weight against the rest of the machine. Linux's autogroup
    scheduling shares the CPU fairly between sessions first and applies nice only within a session,
    and `sms up` starts each node in a session of its own: so the session's autogroup gets the
    niceness too. Only for processes this run started. Returns the pids changed."""
    nice = os.nice(0)
    if nice >= 0:
        return []
    changed = []
    for g in groups:
        for p in _procs(g):
            try:
                if p.nice() > nice:
                    p.nice(nice)
                try:
                    with open(f"/proc/{p.pid}/autogroup", "w") as f:
                        f.write(str(nice))
                except OSError:
                    pass
                changed.append(p.pid)
            except psutil.Error:
                pass
    if say and changed:
        say(f"  priority: nice {nice} (and its autogroup) for {len(changed)} processes of this run")
    return changed
