"""Plain values shared by the core, the ports and the adapters. No I/O here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Role = Literal["member", "admin"]
ROLES: tuple[Role, ...] = ("member", "admin")

MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Room:
    room_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Membership:
    room_id: str
    user_id: str
    role: Role


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message as stored and as gossiped.

    `ts` is a hybrid logical timestamp (see sms.crdt.hlc): it orders history. `origin` is the peer id
    of the node that accepted the send and `seq` that node's per-room sequence number, so receivers
    can spot gaps. `membership_rev` is the etcd revision of the registry the send was authorised at.
    """

    message_id: str
    room_id: str
    sender: str
    body: str
    ts: int
    txn_id: str
    origin: str = ""
    seq: int = 0
    membership_rev: int = 0

    def to_client(self) -> dict[str, object]:
        return {
            "message_id": self.message_id,
            "room_id": self.room_id,
            "sender": self.sender,
            "body": self.body,
            "ts": self.ts,
        }


def message_id_for(room_id: str, sender: str, txn_id: str) -> str:
    """A message's id is derived from (room, sender, txn_id), so a retried send, on any node,
    names the same message and can never be stored twice."""
    digest = hashlib.blake2b(f"{room_id}\x00{sender}\x00{txn_id}".encode(), digest_size=16)
    return digest.hexdigest()
