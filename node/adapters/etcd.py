"""EtcdRegistry: the Registry port (sms.node.ports) over etcd v3, for trio.

Theory of operation
-------------------
pyetcd (the `etcd-sdk-python` distribution) is a blocking gRPC client. Every RPC runs in a worker
thread through `trio.to_thread.run_sync` with this registry's own CapacityLimiter, one RPC per
hop, so a trio cancellation takes effect between RPCs and no RPC outlives its deadline
(`timeout_s`). We use pyetcd's channels, endpoint failover and generated stubs, but build the
requests ourselves: its `transaction()` drops the response header (we need revisions) and its
Watcher neither answers progress requests nor reports a dead stream. Each watch is one raw gRPC
Watch stream read by its own thread, which feeds a trio memory channel through the TrioToken.

Every decision is ONE etcd transaction whose compares pin what the decision was made on; when a
compare fails, someone else changed that state first: re-read and decide again (bounded). The key
layout (also in docs/etcd.md), under `prefix` (default "/sms/"):

    users/id/<user_id>          {"name", "password_hash"}        JSON
    users/name/<name>           <user_id>                        unique-name index
    sessions/<token_hash>       <user_id>                        on a lease of the session TTL
    rooms/id/<room_id>          {"name"}                         JSON
    rooms/name/<name>           <room_id>                        unique-name index
    members/<room_id>/<user_id> "admin" | "member"
    admins/<room_id>            number of admins, as text        the admin-set guard
    nodes/<peer_id>             node info JSON                   on the node's lease
    removed/<peer_id>           {"removed_at"}                   JSON; the operator's denylist

The admin-set guard: every transaction that changes who is an admin of a room rewrites
`admins/<room_id>` and compares its mod_revision with the one it read. Two concurrent demotions of
the last two admins therefore cannot both commit: the second one's compare fails, it re-reads,
sees a single admin left and raises Conflict. One key, so the compare list stays O(1) however
many admins a room has (etcd caps a transaction at 128 operations).

The node denylist: remove_node deletes `nodes/<peer_id>` and writes `removed/<peer_id>` in one
transaction, and register_node's transaction compares that `removed/<peer_id>` does not exist, so
a removed node that is still running cannot register again (Forbidden) until admit_node deletes
the key. Both keys reach every cache through the watch (kinds node and removed_node).

Only hashes of session tokens are ever stored; the raw token never reaches this module.

Errors (the boundary): gRPC/pyetcd failures that mean "etcd is not reachable or not answering"
(UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) become errors.Unavailable with what to
do; a watch that breaks, is compacted away, or stays silent also raises Unavailable (the caller
relists). A request etcd rejects as malformed is our bug: RuntimeError with etcd's reason.
Nothing from pyetcd or grpc escapes.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
import trio
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from ..core.model import ROLES, Membership, Role, Room, User
from ..errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from ..ports import RegistryChange, RegistrySnapshot
from ..registry_feed import serve_node_registration, serve_registry_cache

__all__ = [
    "EtcdNodeLease",
    "EtcdRegistry",
    "serve_node_registration",
    "serve_registry_cache",
]

log = logging.getLogger("sms.etcd")

T = TypeVar("T")

# A compare failed because someone else got there first: re-read and decide again. Every lost
# round means another transaction committed, so this bounds contention, not correctness.
MAX_ATTEMPTS = 64
SNAPSHOT_PAGE = 1000

# gRPC codes that mean "etcd cannot answer right now": the caller may retry later.
_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # includes "database space exceeded"
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,  # "required revision has been compacted": relist
}
_UNAVAILABLE_PYETCD = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.InternalServerError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.WatchTimedOut,
    etcd_exc.RevisionCompactedError,
)

_DELETE_EVENT = 1  # mvccpb.Event.EventType.DELETE
_EQ = etcdrpc.Compare.EQUAL
_GT = etcdrpc.Compare.GREATER


def _range_end(prefix: bytes) -> bytes:
    return pyetcd.utils.prefix_range_end(prefix)


# -- request builders (pure) ----------------------------------------------------------------------


def _get(key: bytes, *, prefix: bool = False) -> etcdrpc.RequestOp:
    req = etcdrpc.RangeRequest(key=key)
    if prefix:
        req.range_end = _range_end(key)
    return etcdrpc.RequestOp(request_range=req)


def _put(key: bytes, value: bytes | str, *, lease: int = 0, prev_kv: bool = False) -> etcdrpc.RequestOp:
    if isinstance(value, str):
        value = value.encode()
    return etcdrpc.RequestOp(
        request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv)
    )


def _delete(key: bytes, *, prefix: bool = False, prev_kv: bool = False) -> etcdrpc.RequestOp:
    req = etcdrpc.DeleteRangeRequest(key=key, prev_kv=prev_kv)
    if prefix:
        req.range_end = _range_end(key)
    return etcdrpc.RequestOp(request_delete_range=req)


def _created(key: bytes, revision: int) -> etcdrpc.Compare:
    """The key exists with this create_revision (0: the key does not exist)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE, result=_EQ, create_revision=revision)


def _exists(key: bytes) -> etcdrpc.Compare:
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE, result=_GT, create_revision=0)


def _unchanged(key: bytes, mod_revision: int) -> etcdrpc.Compare:
    """Nobody wrote or deleted the key since we read it (mod_revision 0: it still does not exist)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.MOD, result=_EQ, mod_revision=mod_revision)


def _has_value(key: bytes, value: str) -> etcdrpc.Compare:
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.VALUE, result=_EQ, value=value.encode())


@dataclass(frozen=True, slots=True)
class _Keys:
    prefix: str

    def _k(self, *parts: str) -> bytes:
        try:
            return (self.prefix + "/".join(parts)).encode()
        except UnicodeEncodeError:
            raise BadRequest("a name or id is not valid Unicode text") from None

    def root(self) -> bytes:
        return self.prefix.encode()

    def user(self, user_id: str) -> bytes:
        return self._k("users", "id", user_id)

    def user_name(self, name: str) -> bytes:
        return self._k("users", "name", name)

    def session(self, token_hash: str) -> bytes:
        return self._k("sessions", token_hash)

    def room(self, room_id: str) -> bytes:
        return self._k("rooms", "id", room_id)

    def room_name(self, name: str) -> bytes:
        return self._k("rooms", "name", name)

    def admins(self, room_id: str) -> bytes:
        return self._k("admins", room_id)

    def member(self, room_id: str, user_id: str) -> bytes:
        return self._k("members", room_id, user_id)

    def members(self, room_id: str) -> bytes:
        return self._k("members", room_id, "")

    def node(self, peer_id: str) -> bytes:
        return self._k("nodes", peer_id)

    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def removed(self, peer_id: str) -> bytes:
        return self._k("removed", peer_id)

    def removed_all(self) -> bytes:
        return self._k("removed", "")

    def parse(self, key: bytes) -> tuple[str, tuple[str, ...]] | None:
        """(kind, key parts) for a key the cache holds; None for the others (name indexes, admin
        guards) and for foreign keys."""
        text = key.decode(errors="replace")
        if not text.startswith(self.prefix):
            return None
        rest = text[len(self.prefix):]
        if rest.startswith("users/id/"):
            return "user", (rest[len("users/id/"):],)
        if rest.startswith("rooms/id/"):
            return "room", (rest[len("rooms/id/"):],)
        if rest.startswith("sessions/"):
            return "session", (rest[len("sessions/"):],)
        if rest.startswith("members/"):
            room_id, sep, user_id = rest[len("members/"):].partition("/")
            if sep and room_id and user_id:
                return "member", (room_id, user_id)
        if rest.startswith("nodes/") and len(rest) > len("nodes/"):
            return "node", (rest[len("nodes/"):],)
        if rest.startswith("removed/") and len(rest) > len("removed/"):
            return "removed_node", (rest[len("removed/"):],)
        return None


def _decode(kind: str, parts: tuple[str, ...], value: bytes) -> object:
    if kind == "user":
        return User(user_id=parts[0], name=json.loads(value)["name"])
    if kind == "room":
        return Room(room_id=parts[0], name=json.loads(value)["name"])
    if kind == "member":
        role = value.decode()
        if role not in ROLES:
            raise RuntimeError(f"etcd holds an unknown role {role!r} for member {parts}")
        return role
    if kind == "session":
        return value.decode()
    if kind == "node":
        return _decode_node(parts[0], value)
    if kind == "removed_node":
        return _decode_node(parts[0], value, what="removal record")
    raise AssertionError(kind)


def _decode_node(peer_id: str, value: bytes, *, what: str = "node record") -> dict[str, object]:
    """A node's info (or its removal record). The key's presence is what admits (or denylists)
    the node; its value only describes it, so a record someone wrote by hand that is not a JSON
    object is kept as {} (with a warning) rather than taking down every node's registry feed."""
    try:
        info = json.loads(value)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        log.warning("etcd holds a %s for %s that is not a JSON object; treating it as {}", what, peer_id)
        return {}
    return info


def _removal_record() -> str:
    return json.dumps({"removed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _removed_error(peer_id: str) -> Forbidden:
    return Forbidden(f"node {peer_id} was removed by an operator; `sms nodes admit {peer_id}` lets it back")


def _role_of(kvs: Sequence[Any]) -> Role | None:
    if not kvs:
        return None
    role = kvs[0].value.decode()
    return role if role in ROLES else None  # type: ignore[return-value]


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise BadRequest(f"a {what} name must be a non-empty string")
    return name


def _check_ttl(ttl_s: object) -> int:
    if not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or ttl_s < 1:
        raise BadRequest("a lease TTL must be a whole number of seconds >= 1")
    return ttl_s


def _never_sent(exc: grpc.RpcError) -> bool:
    """Whether gRPC failed before the request left: no connection to the member at all."""
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details.lower() or "connection refused" in details.lower()
    )


def parse_etcd_urls(url: str) -> list[tuple[str, int]]:
    """"http://h:p,http://h2:p2" (or bare "h:p") -> [(host, port), ...]."""
    out = []
    for part in (p.strip() for p in url.split(",")):
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        u = urlsplit(part)
        if u.scheme != "http":
            raise ValueError(f"unsupported etcd URL {part!r}: only http:// is supported")
        if not u.hostname or not u.port:
            raise ValueError(f"etcd URL {part!r} needs a host and a port")
        out.append((u.hostname, u.port))
    if not out:
        raise ValueError("no etcd URL given")
    return out


# -- the watch thread -----------------------------------------------------------------------------


class _StreamEnded(Exception):
    pass


class _WatchStream:
    """One gRPC Watch stream, read by its own thread, each response sent into a trio channel.

    The last item the thread sends is an exception (the gRPC error, or _StreamEnded); after
    `cancel()` it sends nothing more. A closed receiving side or a finished trio run ends the
    thread too.
    """

    def __init__(
        self,
        stub: etcdrpc.WatchStub,
        create: etcdrpc.WatchRequest,
        send: trio.MemorySendChannel[object],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self._stub = stub
        self._send = send
        self._token = token
        self._requests: queue.SimpleQueue[etcdrpc.WatchRequest | None] = queue.SimpleQueue()
        self._requests.put(create)
        self._call: Any = None
        self._cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sms-etcd-watch", daemon=True)

    def _request_iter(self) -> Iterator[etcdrpc.WatchRequest]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _deliver(self, item: object) -> bool:
        try:
            trio.from_thread.run(self._send.send, item, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return False
        return True

    def _run(self) -> None:
        outcome: BaseException
        try:
            call = self._stub.Watch(self._request_iter())
            self._call = call
            if self._cancelled.is_set():
                call.cancel()
            for response in call:
                if not self._deliver(response):
                    return
            outcome = _StreamEnded("etcd closed the watch stream")
        except grpc.RpcError as exc:
            outcome = exc
        except Exception as exc:  # a bug: hand it to the trio side rather than lose it
            outcome = exc
        finally:
            self._requests.put(None)
        if not self._cancelled.is_set():
            self._deliver(outcome)

    def start(self) -> None:
        self.thread.start()

    def request_progress(self) -> None:
        self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def cancel(self) -> None:
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._requests.put(None)


# -- the registry ---------------------------------------------------------------------------------


class EtcdNodeLease:
    """A node's record under its etcd lease (implements ports.NodeLease)."""

    def __init__(self, registry: EtcdRegistry, peer_id: str, lease_id: int, ttl_s: int) -> None:
        self._registry = registry
        self.peer_id = peer_id
        self.lease_id = lease_id
        self.ttl_s = ttl_s

    async def keepalive(self) -> None:
        ttl = await self._registry._keepalive(self.lease_id)
        if ttl <= 0:
            raise NotFound(f"the registration of node {self.peer_id} expired; register again")

    async def revoke(self) -> None:
        await self._registry._revoke(self.lease_id)

    def __repr__(self) -> str:
        return f"EtcdNodeLease(peer_id={self.peer_id!r}, lease_id={self.lease_id:#x}, ttl_s={self.ttl_s})"


class EtcdRegistry:
    """The Registry port over etcd. Build it with `await EtcdRegistry.connect(url)`; end with
    `await registry.close()`. Safe to use from many trio tasks at once."""

    def __init__(
        self,
        client: pyetcd.MultiEndpointEtcd3Client,
        *,
        urls: str,
        prefix: str,
        timeout_s: float,
        watch_idle_s: float,
        max_threads: int,
    ) -> None:
        self._client = client
        self._urls = urls
        self._keys = _Keys(prefix)
        self._timeout_s = timeout_s
        self._watch_idle_s = watch_idle_s
        self._limiter = trio.CapacityLimiter(max_threads)
        self._rng = random.Random()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "/sms/",
        # 2 s: with its quorum lost, a surviving member holds each request until the deadline, so
        # this is how long a membership change takes to fail with 503 (5 s was measured at 5 s;
        # loopback transactions take ~10 ms). See docs/benchmarks-consensus.md.
        timeout_s: float = 2.0,
        watch_idle_s: float = 5.0,
        max_threads: int = 16,
    ) -> EtcdRegistry:
        """Connects to etcd at `url` (one or more comma-separated http://host:port) and checks it
        answers. Raises Unavailable if it does not within `timeout_s`, ValueError for a bad URL.

        `timeout_s` is the deadline of every RPC; a watch that receives nothing for
        `watch_idle_s` asks etcd for progress and gives up (Unavailable) if that goes unanswered
        for another `timeout_s`.
        """
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"the etcd key prefix must start and end with '/', not {prefix!r}")
        hosts = parse_etcd_urls(url)
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Find a dead connection without waiting for TCP: etcd allows pings every 5 s.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        # time_retry: how long pyetcd shuns an endpoint after a failure. With one endpoint it
        # must never shun it (it would refuse every call for 5 minutes, its default).
        time_retry = 0.0 if len(hosts) == 1 else 2.0
        endpoints = [
            pyetcd.Endpoint(host, port, secure=False, time_retry=time_retry, opts=options)
            for host, port in hosts
        ]
        client = pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=timeout_s, failover=True)
        registry = cls(
            client,
            urls=",".join(f"http://{h}:{p}" for h, p in hosts),
            prefix=prefix,
            timeout_s=timeout_s,
            watch_idle_s=watch_idle_s,
            max_threads=max_threads,
        )
        try:
            await registry.ping()
        except BaseException:
            await registry.close()
            raise
        return registry

    async def close(self) -> None:
        """Closes the gRPC channels; running watches end with Unavailable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)

    @property
    def prefix(self) -> str:
        return self._keys.prefix

    # -- the boundary: every RPC goes through here

    def _unavailable(self, what: str) -> Unavailable:
        return Unavailable(
            f"etcd at {self._urls} is not answering ({what}); check that etcd is running and "
            "that the node's etcd URL points at it, then retry"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, grpc.RpcError):
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code in _UNAVAILABLE_CODES or code is None:
                return self._unavailable(f"{getattr(code, 'name', 'error')}: {details}")
            return RuntimeError(f"etcd rejected a request ({code.name}: {details}); this is a bug in sms")
        if isinstance(exc, _UNAVAILABLE_PYETCD):
            cause = exc.__context__
            if isinstance(cause, grpc.RpcError) and hasattr(cause, "details"):
                return self._unavailable(f"{type(exc).__name__}: {cause.details()}")
            return self._unavailable(type(exc).__name__)
        if isinstance(exc, etcd_exc.Etcd3Exception):
            return RuntimeError(f"etcd rejected a request ({type(exc).__name__}: {exc}); this is a bug in sms")
        return exc

    def _rpc(self, fn: Callable[[], T]) -> T:
        """In a worker thread: run one RPC, marking a failed endpoint so pyetcd fails over.

        A failure that proves the request never reached etcd (no connection to that member) is
        retried at once on the next endpoint, up to once per endpoint: safe for every RPC (etcd's
        own client does the same). Without it, pyetcd's failover picks the first endpoint not
        yet marked failed, often a dead member, and that call failed with 503 while a healthy
        member was there (tests/cluster/test_consensus.py saw it in about half the runs).
        Likewise, when every endpoint failed within pyetcd's `time_retry`, the one that failed
        longest ago is asked again instead of refusing without asking anyone (which kept
        answering 503 for up to 2 s after etcd was back)."""
        for attempt in range(len(self._client.endpoints)):
            try:
                return fn()
            except etcd_exc.NoServerAvailableError:
                if attempt + 1 < len(self._client.endpoints):
                    min(self._client.endpoints.values(), key=lambda e: e.last_failed).last_failed = 0
                    continue
                raise
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise
                # Marks the endpoint failed (so the next call fails over) and re-raises, as
                # pyetcd's own methods do; we translate at the await.
                try:
                    self._client._manage_grpc_errors(exc)
                except etcd_exc.ConnectionFailedError:
                    if attempt + 1 < len(self._client.endpoints) and _never_sent(exc):
                        continue
                    raise
                raise
        raise AssertionError("unreachable")

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise Unavailable("this etcd registry is closed")
        try:
            return await trio.to_thread.run_sync(functools.partial(self._rpc, fn), limiter=self._limiter)
        except (grpc.RpcError, etcd_exc.Etcd3Exception) as exc:
            raise self._translate(exc) from None

    async def _txn(
        self,
        compare: Sequence[etcdrpc.Compare],
        success: Sequence[etcdrpc.RequestOp],
        failure: Sequence[etcdrpc.RequestOp] = (),
    ) -> etcdrpc.TxnResponse:
        req = etcdrpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._call(lambda: self._client.kvstub.Txn(req, self._timeout_s))

    async def _read(self, *ops: etcdrpc.RequestOp) -> tuple[int, list[list[Any]]]:
        """Several reads at one revision (a read-only transaction): (revision, kvs per read)."""
        resp = await self._txn((), ops)
        return resp.header.revision, [list(r.response_range.kvs) for r in resp.responses]

    async def _range(self, req: etcdrpc.RangeRequest) -> etcdrpc.RangeResponse:
        return await self._call(lambda: self._client.kvstub.Range(req, self._timeout_s))

    async def _grant(self, ttl_s: int) -> int:
        req = etcdrpc.LeaseGrantRequest(TTL=ttl_s, ID=0)
        resp = await self._call(lambda: self._client.leasestub.LeaseGrant(req, self._timeout_s))
        return int(resp.ID)

    async def _keepalive(self, lease_id: int) -> int:
        """Refreshes a lease once; its remaining TTL (<= 0: it is gone)."""
        req = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def once() -> int:
            for resp in self._client.leasestub.LeaseKeepAlive(iter([req]), self._timeout_s):
                return int(resp.TTL)
            return 0

        return await self._call(once)

    async def _revoke(self, lease_id: int) -> None:
        req = etcdrpc.LeaseRevokeRequest(ID=lease_id)

        def revoke() -> None:
            try:
                self._client.leasestub.LeaseRevoke(req, self._timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # already expired or revoked
                    raise

        await self._call(revoke)

    async def _backoff(self, attempt: int) -> None:
        # Losing a compare means another writer committed; a little jitter spreads the herd.
        await trio.sleep(self._rng.random() * min(0.002 * attempt, 0.05))

    def _contention(self, what: str) -> Unavailable:
        return Unavailable(f"{what}: too many concurrent changes to the same room; retry")

    # -- accounts and sessions

    async def create_user(self, name: str, password_hash: str) -> User:
        _check_name(name, "user")
        k = self._keys
        user = User(user_id=uuid.uuid4().hex, name=name)
        record = json.dumps({"name": name, "password_hash": password_hash})
        resp = await self._txn(
            [_created(k.user_name(name), 0)],
            [_put(k.user(user.user_id), record), _put(k.user_name(name), user.user_id)],
        )
        if not resp.succeeded:
            raise Conflict(f"the user name {name!r} is taken")
        return user

    async def find_user_by_name(self, name: str) -> tuple[User, str] | None:
        _, (kvs,) = await self._read(_get(self._keys.user_name(name)))
        if not kvs:
            return None
        user_id = kvs[0].value.decode()
        _, (kvs,) = await self._read(_get(self._keys.user(user_id)))
        if not kvs:
            return None
        record = json.loads(kvs[0].value)
        return User(user_id=user_id, name=record["name"]), record["password_hash"]

    async def get_user(self, user_id: str) -> User | None:
        _, (kvs,) = await self._read(_get(self._keys.user(user_id)))
        return _decode("user", (user_id,), kvs[0].value) if kvs else None  # type: ignore[return-value]

    async def create_session(self, token_hash: str, user_id: str, ttl_s: int) -> None:
        """Stores the session under a fresh lease of `ttl_s`: it vanishes everywhere at once when
        the lease expires or is revoked. NotFound for an unknown user."""
        _check_ttl(ttl_s)
        k = self._keys
        lease_id = await self._grant(ttl_s)
        try:
            resp = await self._txn(
                [_exists(k.user(user_id)), _created(k.session(token_hash), 0)],
                [_put(k.session(token_hash), user_id, lease=lease_id)],
                [_get(k.user(user_id))],
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._revoke_quietly(lease_id)
            raise
        if not resp.succeeded:
            await self._revoke_quietly(lease_id)
            if not resp.responses[0].response_range.kvs:
                raise NotFound(f"no user {user_id}")
            raise Conflict("a session with this token already exists")

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._revoke(lease_id)
        except Unavailable:
            pass  # it expires by itself

    async def get_session(self, token_hash: str) -> str | None:
        _, (kvs,) = await self._read(_get(self._keys.session(token_hash)))
        return kvs[0].value.decode() if kvs else None

    async def delete_session(self, token_hash: str) -> None:
        key = self._keys.session(token_hash)
        _, (kvs,) = await self._read(_get(key))
        if not kvs:
            return
        await self._txn([], [_delete(key)])
        if kvs[0].lease:
            await self._revoke_quietly(kvs[0].lease)

    # -- rooms and membership

    async def create_room(self, name: str, creator_id: str) -> Room:
        _check_name(name, "room")
        k = self._keys
        room = Room(room_id=uuid.uuid4().hex, name=name)
        resp = await self._txn(
            [_created(k.room_name(name), 0), _exists(k.user(creator_id))],
            [
                _put(k.room(room.room_id), json.dumps({"name": name})),
                _put(k.room_name(name), room.room_id),
                _put(k.member(room.room_id, creator_id), "admin"),
                _put(k.admins(room.room_id), "1"),
            ],
            [_get(k.room_name(name))],
        )
        if not resp.succeeded:
            if resp.responses[0].response_range.kvs:
                raise Conflict(f"the room name {name!r} is taken")
            raise NotFound(f"no user {creator_id}")
        return room

    async def get_room(self, room_id: str) -> tuple[Room, dict[str, Role]] | None:
        k = self._keys
        _, (room_kvs, member_kvs) = await self._read(_get(k.room(room_id)), _get(k.members(room_id), prefix=True))
        if not room_kvs:
            return None
        room = _decode("room", (room_id,), room_kvs[0].value)
        members: dict[str, Role] = {}
        for kv in member_kvs:
            parsed = k.parse(kv.key)
            if parsed is not None and parsed[0] == "member":
                members[parsed[1][1]] = _decode("member", parsed[1], kv.value)  # type: ignore[assignment]
        return room, members  # type: ignore[return-value]

    async def set_member(self, room_id: str, actor_id: str, user_id: str, role: Role) -> Membership:
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}")
        k = self._keys
        for attempt in range(MAX_ATTEMPTS):
            _, (room_kvs, guard_kvs, actor_kvs, target_kvs, user_kvs) = await self._read(
                _get(k.room(room_id)),
                _get(k.admins(room_id)),
                _get(k.member(room_id, actor_id)),
                _get(k.member(room_id, user_id)),
                _get(k.user(user_id)),
            )
            if not room_kvs:
                raise NotFound(f"no room {room_id}")
            if _role_of(actor_kvs) != "admin":
                raise Forbidden("only an admin of the room can add members or change roles")
            if not user_kvs:
                raise NotFound(f"no user {user_id}")
            current = _role_of(target_kvs)
            if current == role:
                return Membership(room_id=room_id, user_id=user_id, role=role)
            compare = [
                _created(k.room(room_id), room_kvs[0].create_revision),
                _has_value(k.member(room_id, actor_id), "admin"),
                _created(k.user(user_id), user_kvs[0].create_revision),
                _unchanged(k.member(room_id, user_id), target_kvs[0].mod_revision if target_kvs else 0),
            ]
            success = [_put(k.member(room_id, user_id), role)]
            delta = (role == "admin") - (current == "admin")
            if delta:
                admins, guard_rev = self._guard(guard_kvs)
                if admins + delta < 1:
                    raise Conflict("a room needs an admin: promote another member before stepping down")
                compare.append(_unchanged(k.admins(room_id), guard_rev))
                success.append(_put(k.admins(room_id), str(admins + delta)))
            resp = await self._txn(compare, success)
            if resp.succeeded:
                return Membership(room_id=room_id, user_id=user_id, role=role)
            await self._backoff(attempt)
        raise self._contention("set_member")

    async def remove_member(self, room_id: str, actor_id: str, user_id: str) -> None:
        k = self._keys
        for attempt in range(MAX_ATTEMPTS):
            _, (room_kvs, guard_kvs, actor_kvs, target_kvs) = await self._read(
                _get(k.room(room_id)),
                _get(k.admins(room_id)),
                _get(k.member(room_id, actor_id)),
                _get(k.member(room_id, user_id)),
            )
            if not room_kvs:
                raise NotFound(f"no room {room_id}")
            leaving = actor_id == user_id
            if not leaving and _role_of(actor_kvs) != "admin":
                raise Forbidden("only an admin of the room can remove other members")
            current = _role_of(target_kvs)
            if current is None:
                raise NotFound(f"user {user_id} is not a member of room {room_id}")
            compare = [
                _created(k.room(room_id), room_kvs[0].create_revision),
                _unchanged(k.member(room_id, user_id), target_kvs[0].mod_revision),
            ]
            if not leaving:
                compare.append(_has_value(k.member(room_id, actor_id), "admin"))
            success = [_delete(k.member(room_id, user_id))]
            if current == "admin":
                admins, guard_rev = self._guard(guard_kvs)
                if admins <= 1:
                    raise Conflict(
                        "the last admin cannot leave or be removed: promote another member first, "
                        "or delete the room"
                    )
                compare.append(_unchanged(k.admins(room_id), guard_rev))
                success.append(_put(k.admins(room_id), str(admins - 1)))
            resp = await self._txn(compare, success)
            if resp.succeeded:
                return
            await self._backoff(attempt)
        raise self._contention("remove_member")

    async def delete_room(self, room_id: str, actor_id: str) -> None:
        k = self._keys
        for attempt in range(MAX_ATTEMPTS):
            _, (room_kvs, actor_kvs) = await self._read(_get(k.room(room_id)), _get(k.member(room_id, actor_id)))
            if not room_kvs:
                raise NotFound(f"no room {room_id}")
            if _role_of(actor_kvs) != "admin":
                raise Forbidden("only an admin of the room can delete it")
            name = json.loads(room_kvs[0].value)["name"]
            resp = await self._txn(
                [
                    _created(k.room(room_id), room_kvs[0].create_revision),
                    _has_value(k.member(room_id, actor_id), "admin"),
                    _has_value(k.room_name(name), room_id),
                ],
                [
                    _delete(k.room(room_id)),
                    _delete(k.room_name(name)),
                    _delete(k.members(room_id), prefix=True),
                    _delete(k.admins(room_id)),
                ],
            )
            if resp.succeeded:
                return
            await self._backoff(attempt)
        raise self._contention("delete_room")

    def _guard(self, guard_kvs: Sequence[Any]) -> tuple[int, int]:
        """(number of admins, mod_revision) of a room's admin-set guard."""
        if not guard_kvs:
            raise RuntimeError("a room without its admins/ guard key: the registry is corrupt")
        return int(guard_kvs[0].value), int(guard_kvs[0].mod_revision)

    # -- nodes

    async def register_node(self, peer_id: str, info: dict[str, object], ttl_s: int) -> EtcdNodeLease:
        _check_ttl(ttl_s)
        try:
            payload = json.dumps(info)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"node info must be JSON: {exc}") from None
        k = self._keys
        lease_id = await self._grant(ttl_s)
        try:
            resp = await self._txn(
                [_created(k.removed(peer_id), 0)],  # not denylisted by an operator
                [_put(k.node(peer_id), payload, lease=lease_id, prev_kv=True)],
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._revoke_quietly(lease_id)
            raise
        if not resp.succeeded:
            await self._revoke_quietly(lease_id)
            raise _removed_error(peer_id)
        prev = resp.responses[0].response_put.prev_kv
        if prev.lease and prev.lease != lease_id:
            await self._revoke_quietly(prev.lease)  # our previous registration
        return EtcdNodeLease(self, peer_id, lease_id, ttl_s)

    async def list_nodes(self) -> dict[str, dict[str, object]]:
        return await self._list_records(self._keys.nodes(), "node record")

    async def list_removed_nodes(self) -> dict[str, dict[str, object]]:
        return await self._list_records(self._keys.removed_all(), "removal record")

    async def _list_records(self, prefix: bytes, what: str) -> dict[str, dict[str, object]]:
        _, (kvs,) = await self._read(_get(prefix, prefix=True))
        out = {}
        for kv in kvs:
            peer_id = kv.key[len(prefix):].decode()
            out[peer_id] = _decode_node(peer_id, kv.value, what=what)
        return out

    async def remove_node(self, peer_id: str) -> None:
        """Deletes nodes/<peer_id> and writes removed/<peer_id> in one transaction, then revokes
        the lease the deleted record was on (whichever registration was there when it committed,
        so a registration racing with the removal cannot keep a lease alive without a record)."""
        k = self._keys
        resp = await self._txn(
            [], [_delete(k.node(peer_id), prev_kv=True), _put(k.removed(peer_id), _removal_record())]
        )
        for kv in resp.responses[0].response_delete_range.prev_kvs:
            if kv.lease:
                await self._revoke_quietly(kv.lease)

    async def admit_node(self, peer_id: str) -> bool:
        resp = await self._txn([], [_delete(self._keys.removed(peer_id))])
        return resp.responses[0].response_delete_range.deleted > 0

    # -- snapshot, watch, health

    async def revision(self) -> int:
        """The mod_revision of the newest key under the prefix (the registry's own revision; a
        shared etcd's global revision also counts other prefixes' writes, which a watch of this
        prefix never reports). Deletions are not counted: the watchdog this feeds is then only
        less eager, never wrong."""
        req = etcdrpc.RangeRequest(
            key=self._keys.root(),
            range_end=_range_end(self._keys.root()),
            limit=1,
            keys_only=True,
            sort_order=etcdrpc.RangeRequest.DESCEND,
            sort_target=etcdrpc.RangeRequest.MOD,
        )
        resp = await self._range(req)
        return int(resp.kvs[0].mod_revision) if resp.kvs else 0

    async def ping(self) -> None:
        req = etcdrpc.RangeRequest(key=self._keys.root(), count_only=True)
        await self._range(req)

    async def snapshot(self) -> RegistrySnapshot:
        """Everything under the prefix, read in pages pinned to one revision."""
        root = self._keys.root()
        end = _range_end(root)
        start = root
        revision = 0
        snap = RegistrySnapshot(revision=0)
        users, rooms, members, sessions, nodes = snap.users, snap.rooms, snap.members, snap.sessions, snap.nodes
        removed = snap.removed_nodes
        while True:
            req = etcdrpc.RangeRequest(key=start, range_end=end, limit=SNAPSHOT_PAGE, revision=revision)
            resp = await self._range(req)
            if revision == 0:
                revision = int(resp.header.revision)
            for kv in resp.kvs:
                parsed = self._keys.parse(kv.key)
                if parsed is None:
                    continue
                kind, parts = parsed
                value = _decode(kind, parts, kv.value)
                if kind == "user":
                    users[parts[0]] = value  # type: ignore[assignment]
                elif kind == "room":
                    rooms[parts[0]] = value  # type: ignore[assignment]
                elif kind == "member":
                    members.setdefault(parts[0], {})[parts[1]] = value  # type: ignore[assignment]
                elif kind == "session":
                    sessions[parts[0]] = value  # type: ignore[assignment]
                elif kind == "node":
                    nodes[parts[0]] = value  # type: ignore[assignment]
                elif kind == "removed_node":
                    removed[parts[0]] = value  # type: ignore[assignment]
            if not resp.more or not resp.kvs:
                break
            start = resp.kvs[-1].key + b"\0"
        return RegistrySnapshot(
            revision=revision, users=users, rooms=rooms, members=members, sessions=sessions, nodes=nodes,
            removed_nodes=removed,
        )

    async def watch(self, from_revision: int) -> AsyncIterator[RegistryChange]:
        """Changes under the prefix after `from_revision`, in revision order, as RegistryChange
        (progress included, see ports.RegistryChange). Raises Unavailable when the stream breaks,
        when `from_revision` was compacted away, or when the stream stays silent: after
        `watch_idle_s` without a response it asks etcd for progress, and an unanswered request
        means a dead connection. Close it with `contextlib.aclosing` (or just stop iterating and
        let it be collected): its thread and stream end either way."""
        if self._closed:
            raise Unavailable("this etcd registry is closed")
        root = self._keys.root()
        create = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=root, range_end=_range_end(root), start_revision=from_revision + 1, progress_notify=True
            )
        )
        try:
            channel = await trio.to_thread.run_sync(lambda: self._client.channel, limiter=self._limiter)
        except (grpc.RpcError, etcd_exc.Etcd3Exception) as exc:
            raise self._translate(exc) from None
        send, receive = trio.open_memory_channel[object](64)
        stream = _WatchStream(etcdrpc.WatchStub(channel), create, send, trio.lowlevel.current_trio_token())
        stream.start()
        last = from_revision
        try:
            async with receive:
                asked_progress = False
                while True:
                    wait = self._timeout_s if asked_progress else self._watch_idle_s
                    with trio.move_on_after(wait) as silence:
                        item = await receive.receive()
                    if silence.cancelled_caught:
                        if asked_progress:
                            raise Unavailable(
                                f"the etcd watch at {self._urls} went silent (no answer to a progress "
                                f"request in {self._timeout_s:g} s); relist and watch again"
                            )
                        stream.request_progress()
                        asked_progress = True
                        continue
                    asked_progress = False
                    if isinstance(item, BaseException):
                        if isinstance(item, _StreamEnded):
                            raise self._unavailable(str(item))
                        raise self._translate(item) from None
                    for change in self._changes(item, last):
                        last = change.revision
                        yield change
        finally:
            stream.cancel()

    def _changes(self, resp: Any, last: int) -> list[RegistryChange]:
        """One watch response -> the changes it reports (see the progress rules in the module
        docstring of ports.RegistryChange)."""
        if resp.compact_revision:
            raise Unavailable(
                f"etcd compacted the registry history past revision {last} "
                f"(now {resp.compact_revision}); relist"
            )
        if resp.canceled:
            raise self._unavailable(f"watch cancelled: {resp.cancel_reason or 'no reason given'}")
        if resp.created:
            return []
        if not resp.events:
            # A progress notification. Only trust it when it comes from the watcher itself
            # (progress_notify): etcd < 3.5.8 answers an explicit progress request (watch id -1)
            # with the store revision even while events are still queued for us (etcd#15220),
            # which would let a cache skip them. Those answers only prove the stream is alive.
            if resp.watch_id != -1 and resp.header.revision > last:
                return [RegistryChange(revision=int(resp.header.revision), kind="progress", key=(), value=None)]
            return []
        out: list[RegistryChange] = []
        newest = last
        for event in resp.events:
            kv = event.kv
            revision = int(kv.mod_revision)
            newest = max(newest, revision)
            parsed = self._keys.parse(kv.key)
            if parsed is None:
                continue
            kind, parts = parsed
            if event.type == _DELETE_EVENT:
                out.append(RegistryChange(revision=revision, kind=kind, key=parts, value=None, deleted=True))
            else:
                out.append(RegistryChange(revision=revision, kind=kind, key=parts, value=_decode(kind, parts, kv.value)))
        if newest > (out[-1].revision if out else last):
            # Keys the cache does not hold (name indexes, guards) changed: say how far we got.
            out.append(RegistryChange(revision=newest, kind="progress", key=(), value=None))
        return out
