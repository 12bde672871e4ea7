"""A small linearizability checker for the histories the consensus tests record. Pure: no I/O.

A history is a list of `Op`s: what a client asked (`call`), when it asked and when it got its
answer (`invoke`, `complete`, from one monotonic clock), and the answer (`result`). The history is
linearizable if the operations can be put in one order that (1) respects real time (an op that
completed before another was invoked comes first) and (2) gives, applied one by one to a
sequential model (`step`), exactly the answers the clients got.

An op whose answer says nothing about its outcome (a 503 "etcd unavailable", a timeout) is
*indeterminate*: `complete=None`. It may have taken effect at any point after its invocation, or
never; the search tries both.

The search is Wing & Gong's, with the memoisation of Lowe (as in Knossos/Porcupine): depth-first
over "which op takes effect next", skipping (set of ops done, model state) pairs already explored.
The state must be hashable. For the histories here (a few hundred ops, at most ~20 concurrent)
it finishes in milliseconds; `max_steps` bounds it anyway.

Models (pure step functions: `step(state, call) -> (answer, new state)`):

- `rooms_step`: room creation; state = frozenset of (name, creator); ("create", name, user) ->
  201 if the name is free, else 409.
- `membership_step`: one room's members; state = frozenset of (user, role); ("set", actor,
  target, role) mirrors EtcdRegistry.set_member's decision (403 unless the actor is an admin;
  200 without change if the target already has the role; 409 if no admin would remain), and
  ("read",) returns the state (a read that is known to be linearizable, e.g. one made after every
  write completed and every node's cache agreed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence

__all__ = [
    "Op",
    "Verdict",
    "check_linearizable",
    "membership_step",
    "rooms_step",
    "admin_count",
]

Step = Callable[[Hashable, tuple], tuple[object, Hashable]]


@dataclass(frozen=True)
class Op:
    call: tuple
    invoke: float
    complete: float | None  # None: indeterminate (no answer, or one that does not say)
    result: object = None
    process: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def determinate(self) -> bool:
        return self.complete is not None


@dataclass
class Verdict:
    ok: bool
    order: list[Op] | None  # one linearization (indeterminate ops that were dropped are left out)
    explored: int
    explanation: str = ""

    def __bool__(self) -> bool:
        return self.ok


def check_linearizable(ops: Sequence[Op], init: Hashable, step: Step, *, max_steps: int = 2_000_000) -> Verdict:
    """Whether `ops` is linearizable with respect to the model (`init`, `step`)."""
    ops = sorted(ops, key=lambda o: o.invoke)
    n = len(ops)
    ends = [o.complete if o.complete is not None else math.inf for o in ops]
    full = (1 << n) - 1
    seen: set[tuple[int, Hashable]] = set()
    explored = 0
    deepest: tuple[int, Hashable, int] = (0, init, 0)

    def candidates(done: int) -> list[int]:
        # o may go next iff no remaining op completed before o was invoked.
        horizon = math.inf
        for i in range(n):
            if not done >> i & 1 and ends[i] < horizon:
                horizon = ends[i]
        out = []
        for i in range(n):
            if ops[i].invoke > horizon:
                break  # sorted by invoke: nothing later qualifies
            if not done >> i & 1:
                out.append(i)
        return out

    # Iterative DFS: each frame is (done mask, state, chosen path, pending moves).
    # A move is (op index, apply?) ; apply=False drops an indeterminate op.
    stack: list[tuple[int, Hashable, list[int], list[tuple[int, bool]]]] = []

    def moves(done: int) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = []
        for i in candidates(done):
            out.append((i, True))
            if not ops[i].determinate:
                out.append((i, False))
        out.reverse()  # pop() takes the earliest-invoked first
        return out

    stack.append((0, init, [], moves(0)))
    seen.add((0, init))
    while stack:
        done, state, path, pending = stack[-1]
        if done == full:
            order = [ops[i] for i in path]
            return Verdict(True, order, explored)
        if not pending:
            stack.pop()
            continue
        i, apply = pending.pop()
        explored += 1
        if explored > max_steps:
            return Verdict(False, None, explored, f"gave up after {max_steps} steps (history too concurrent)")
        if apply:
            answer, new_state = step(state, ops[i].call)
            if ops[i].determinate and answer != ops[i].result:
                continue
        else:
            new_state = state
        new_done = done | (1 << i)
        key = (new_done, new_state)
        if key in seen:
            continue
        seen.add(key)
        new_path = path + [i] if apply else path
        depth = bin(new_done).count("1")
        if depth > deepest[0]:
            deepest = (depth, new_state, new_done)
        stack.append((new_done, new_state, new_path, moves(new_done)))
    depth, state, done = deepest
    stuck = [ops[i] for i in candidates(done)]
    lines = "\n".join(
        f"  {o.process} {o.call} -> {o.result!r} [{o.invoke:.4f}, {o.complete if o.complete is not None else '?'}]"
        for o in stuck[:10]
    )
    return Verdict(
        False, None, explored,
        f"not linearizable: at most {depth} of {n} ops can be ordered; then, in state {sorted(state, key=repr) if isinstance(state, frozenset) else state!r},"
        f" no op that may go next gives the answer its client got:\n{lines}",
    )


# -- models ---------------------------------------------------------------------------------------


def rooms_step(state: frozenset, call: tuple) -> tuple[object, frozenset]:
    kind, name, user = call
    assert kind == "create", call
    if any(n == name for n, _ in state):
        return 409, state
    return 201, state | {(name, user)}


def admin_count(members: Iterable[tuple[str, str]]) -> int:
    return sum(1 for _, role in members if role == "admin")


def membership_step(state: frozenset, call: tuple) -> tuple[object, frozenset]:
    if call[0] == "read":
        return state, state
    kind, actor, target, role = call
    assert kind == "set", call
    roles = dict(state)
    if roles.get(actor) != "admin":
        return 403, state
    current = roles.get(target)
    if current == role:
        return 200, state
    delta = (role == "admin") - (current == "admin")
    if admin_count(state) + delta < 1:
        return 409, state
    roles[target] = role
    return 200, frozenset(roles.items())
