"""RoomLog against a dumb model: a plain list of delivered ops, with every read recomputed by
brute force (sort everything, scan everything) on each step."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crdt_strategies import ROOM, crdt_settings
from sms.crdt.hlc import pack
from sms.crdt.roomlog import Delta, EditEntry, Entry, MessageEntry, RoomLog
from sms.crdt.vv import SeqRange, VersionVector

ORIGINS = ["A", "B", "C"]


def _key(e: Entry) -> tuple[int, str, int]:
    return (e.ts, e.origin, e.seq)


class Model:
    def __init__(self) -> None:
        self.ops: list[Entry] = []

    def add(self, e: Entry) -> bool:
        if any((o.origin, o.seq) == (e.origin, e.seq) for o in self.ops):
            return False
        self.ops.append(e)
        return True

    def ordered(self) -> list[tuple[tuple[int, str, str], str | None, MessageEntry]]:
        rows = []
        for mid in {o.message_id for o in self.ops if isinstance(o, MessageEntry)}:
            copies = sorted((o for o in self.ops if isinstance(o, MessageEntry) and o.message_id == mid), key=_key)
            canon = copies[0]
            edits = [o for o in self.ops if isinstance(o, EditEntry) and o.message_id == mid]
            if any(e.body is None for e in edits):
                body = None
            else:
                body = max([canon, *edits], key=_key).body
            rows.append(((canon.ts, canon.origin, mid), body, canon))
        return sorted(rows, key=lambda r: r[0])

    def vv(self) -> VersionVector:
        out = {}
        for origin in ORIGINS:
            held = {o.seq for o in self.ops if o.origin == origin}
            n = 0
            while n + 1 in held:
                n += 1
            out[origin] = n
        return VersionVector(out)

    def gaps(self) -> list[SeqRange]:
        out = []
        for origin in ORIGINS:
            held = {o.seq for o in self.ops if o.origin == origin}
            missing = [s for s in range(1, max(held, default=0)) if s not in held]
            for s in missing:
                if out and out[-1].origin == origin and out[-1].last == s - 1:
                    out[-1] = SeqRange(origin, out[-1].first, s)
                else:
                    out.append(SeqRange(origin, s, s))
        return out


class RoomLogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = RoomLog(ROOM)
        self.model = Model()
        self.authored: list[Entry] = []  # every op any origin created; delivery is separate
        self.next_seq = {o: 1 for o in ORIGINS}
        self.ms = 0

    def _author(self, origin: str, make) -> None:
        self.ms += 1
        e = make(pack(self.ms, 0), self.next_seq[origin])
        self.next_seq[origin] += 1
        self.authored.append(e)

    @rule(origin=st.sampled_from(ORIGINS), k=st.integers(0, 6), body=st.sampled_from(["a", "b"]),
          back=st.integers(0, 3))
    def author_message(self, origin: str, k: int, body: str, back: int) -> None:
        # `back` lets a timestamp land before earlier ones, as a slow peer's would.
        self._author(origin, lambda ts, seq: MessageEntry(
            f"m{k}", ROOM, f"u{k}", body, max(ts - (back << 16), 0), origin, seq, f"t{k}"))

    @rule(origin=st.sampled_from(ORIGINS), k=st.integers(0, 6), body=st.sampled_from(["x", "y", None]))
    def author_edit(self, origin: str, k: int, body: str | None) -> None:
        self._author(origin, lambda ts, seq: EditEntry(f"m{k}", ROOM, f"u{k}", body, ts, origin, seq))

    @precondition(lambda self: self.authored)
    @rule(data=st.data())
    def deliver_one(self, data: st.DataObject) -> None:
        e = data.draw(st.sampled_from(self.authored))
        assert self.log.add(e) == self.model.add(e)

    @precondition(lambda self: self.authored)
    @rule(data=st.data())
    def deliver_batch(self, data: st.DataObject) -> None:
        batch = data.draw(st.lists(st.sampled_from(self.authored), max_size=6))
        new = self.log.apply(Delta(ROOM, tuple(batch)))
        expected = [e for e in dict.fromkeys(batch) if self.model.add(e)]
        assert sorted(new, key=_key) == new
        assert set(new) == set(expected)

    @rule(data=st.data())
    def diff_matches(self, data: st.DataObject) -> None:
        vv = VersionVector({o: data.draw(st.integers(0, 4)) for o in ORIGINS})
        got = set(self.log.diff(vv))
        assert got == {e for e in self.model.ops if e.seq > vv.get(e.origin)}

    @invariant()
    def reads_match_model(self) -> None:
        expected = self.model.ordered()
        got = self.log.ordered()
        assert [(v.position, v.body, v.message) for v in got] == expected
        assert self.log.version_vector() == self.model.vv()
        assert self.log.gaps() == self.model.gaps()
        assert self.log.op_count() == len(self.model.ops)
        assert set(self.log.entries()) == set(self.model.ops)
        if got:
            mid = got[len(got) // 2]
            assert self.log.after(mid.position) == got[len(got) // 2 + 1 :]


RoomLogMachine.TestCase.settings = settings(crdt_settings(60), stateful_step_count=30)
TestRoomLogModel = RoomLogMachine.TestCase
