"""The sms load generator's events WebSockets on one plain `selectors` loop, in a thread of its own.

Why: the generator shares the machine's two cores with the system it measures. Under trio, at
2,000 sends/s, more than half of its CPU was trio itself (the scheduler, an epoll registration
per read, a cancel scope per send, a reader task per socket and a writer per sender waking). Here
every socket is registered once, one thread waits on all of them, and a point's sends are started
from the same loop that reads the answers: no task, no channel, no cancel scope per message.

The protocol is benchmarks/wsmini.py's sans-IO part (frames, MessageReader, the handshake), the
point's bookkeeping is benchmarks/engine.py's OpenLoop: a point run here means what
engine.run_point means (open loop by the clock, at most max_in_flight sends awaiting their
answer, a timeout per send, then a bounded wait for answers and a bounded drain).

The loop thread owns the sockets from `start` to `stop` and reads them between points too (it
answers pings, counts frames, and hands deliveries to `sink`, e.g. the transport's probe).
Other threads talk to it only through `submit`, which runs a function in the loop thread.
"""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from typing import Callable

import orjson
import trio

from .engine import OpenLoop, WindowHook, measured_window, run_window
from .httpmini import HttpError
from .recorder import Recorder
from .schedule import Plan, Workload, make_schedule, parse_body
from .wsmini import (
    MAX_MESSAGE, OP_CLOSE, OP_PONG, OP_TEXT, READ_SIZE, CloseReason, HandshakeError, MessageReader,
    check_handshake_response, encode_frame, handshake_request, parse_ws_url, response_head_end,
)

clock = time.monotonic   # the engine's clock
Sink = Callable[[int, str, float], None]
IDLE_WAIT_S = 1.0        # longest sleep between points (a submitted job wakes the loop at once)


def frame_events(text: str | bytes) -> list[dict]:
    """The events one frame of the events socket carries: a batch's, or the frame itself; none for
    what is not a JSON object (skipped: the point then counts what never arrived)."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(frame, dict):
        return []
    events = frame.get("events", ()) if frame.get("type") == "batch" else (frame,)
    return [e for e in events if isinstance(e, dict)]


def dispatch_frame(text: str | bytes, client: int, t: float, sink: Sink | None,
                   answered: Callable[[object, Exception | None, float], None]) -> None:
    """One frame read by `client` at `t`: each delivered body to `sink(client, body, t)`, each ack
    or error to `answered(txn_id, None or the error, t)`."""
    for event in frame_events(text):
        kind = event.get("type")
        if kind == "message":
            body = event.get("body")
            if sink is not None and isinstance(body, str):
                sink(client, body, t)
        elif kind == "ack" or kind == "error":
            answered(event.get("txn_id"), answer_error(event), t)


def answer_error(event: dict) -> HttpError | None:
    """What an ack or error event says of its send: None for an ack; for an error, the HTTP error
    the PUT would have given (so both ways of sending count failures alike)."""
    if event.get("type") != "error":
        return None
    return HttpError(int(event.get("status") or 0), orjson.dumps(event.get("error")))


def open_events_socket(url: str, timeout_s: float = 60.0) -> tuple[socket.socket, bytes]:
    """Connect and do the WebSocket handshake (blocking, all within `timeout_s`); returns the
    socket, now non-blocking with TCP_NODELAY, and any bytes that came after the 101 response."""
    host, port, target, host_header = parse_ws_url(url)
    deadline = clock() + timeout_s
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        # trio sets this on every TCP stream; without it a small send frame may wait for an ack
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, key = handshake_request(host_header, target)
        sock.sendall(request)
        buf = bytearray()
        while (end := response_head_end(buf)) is None:
            sock.settimeout(max(0.001, deadline - clock()))
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                raise HandshakeError(None, bytes(buf))
            buf += chunk
        check_handshake_response(buf, key)
        sock.setblocking(False)
        return sock, bytes(buf[end:])
    except BaseException:
        sock.close()
        raise


class MaskKeys:
    """RFC 6455 masking keys from os.urandom, read 4 KiB at a time: one system call per 1,024
    frames instead of one per frame (at 2,000 sends/s that was 2,000 getrandom calls a second)."""

    def __init__(self, batch: int = 4096) -> None:
        self._batch = batch
        self._buf = b""
        self._pos = 0

    def next(self) -> bytes:
        if self._pos + 4 > len(self._buf):
            self._buf, self._pos = os.urandom(self._batch), 0
        pos = self._pos
        self._pos = pos + 4
        return self._buf[pos:pos + 4]


class _Client:
    """One open events socket: its reader state and the bytes waiting to be written."""

    __slots__ = ("index", "sock", "reader", "out", "writing", "close_sent")

    def __init__(self, index: int, sock: socket.socket, max_message_size: int) -> None:
        self.index = index
        self.sock = sock
        self.reader = MessageReader(max_message_size)
        self.out = bytearray()
        self.writing = False     # registered for EVENT_WRITE: the kernel refused part of `out`
        self.close_sent = False


class EventsLoop:
    """Client i's events socket is `add`ed before `start`; afterwards only the loop thread touches
    the sockets. `on_close(client, reason)` is called (in the loop thread) when the server closes
    a socket or it is lost; `frames` counts the messages read."""

    def __init__(self, on_close: Callable[[int, CloseReason], None] = lambda c, r: None,
                 max_message_size: int = MAX_MESSAGE) -> None:
        self.on_close = on_close
        self.max_message_size = max_message_size
        self.frames = 0
        self.sink: Sink | None = None                 # deliveries: (client, body, monotonic time read)
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._dirty: set[_Client] = set()             # clients with bytes to write
        self._leftovers: list[tuple[_Client, bytes]] = []
        self._pending: dict[str, tuple[int, int]] = {}   # txn id -> (client, m) of a point's send
        self._answer: Callable[[int, BaseException | None, float], None] | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mask = MaskKeys().next

    # -- life cycle (any thread)

    def add(self, client: int, sock: socket.socket, leftover: bytes = b"") -> None:
        """Takes over an open, non-blocking events socket (before `start`)."""
        if self._thread is not None:
            raise RuntimeError("add sockets before start")
        c = _Client(client, sock, self.max_message_size)
        self._clients[client] = c
        self._selector.register(sock, selectors.EVENT_READ, c)
        if leftover:
            self._leftovers.append((c, leftover))

    @property
    def open_clients(self) -> int:
        return len(self._clients)

    def is_open(self, client: int) -> bool:
        return client in self._clients

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="sms-bench-wsloop", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> Future:
        """Runs `job()` in the loop thread (between reads); its result or exception ends up in the
        returned Future."""
        future: Future = Future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(RuntimeError("the events loop is not running"))
            return future
        self._jobs.put((job, future))
        self._wake()
        return future

    def stop(self, timeout_s: float = 5.0) -> None:
        """Closes every socket (with a close frame, 1000) and ends the thread, within `timeout_s`."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._close_all()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is already waiting, or the loop is gone

    # -- the loop thread

    def _serve(self) -> None:
        try:
            for c, data in self._leftovers:   # events that came with the handshake response
                self._received(c, data)
            self._leftovers.clear()
            self.flush()
            while not self._stopping:
                self._run_jobs()
                self.pump(IDLE_WAIT_S)
        finally:
            self._fail_jobs()
            self._close_all()

    def _run_jobs(self) -> None:
        while True:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the job
                future.set_exception(exc)

    def _fail_jobs(self) -> None:
        while True:
            try:
                _, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the events loop stopped"))

    def pump(self, timeout_s: float | None) -> None:
        """Waits at most `timeout_s` for the sockets, then reads and writes what is ready."""
        for key, mask in self._selector.select(timeout_s):
            c = key.data
            if c is None:
                self._drain_wake()
                continue
            if mask & selectors.EVENT_READ:
                self._read(c)
            if mask & selectors.EVENT_WRITE and c.index in self._clients:
                self._write(c)
        self.flush()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(c, CloseReason(1006, "connection lost without a close frame"))
            return
        self._received(c, data)

    def _received(self, c: _Client, data: bytes) -> None:
        messages, pongs, close_reply = c.reader.receive(data)
        for message in messages:
            # one clock reading per message: every event of a batch frame was read at once
            t = clock()
            self.frames += 1
            if isinstance(message, str):
                self._on_text(c.index, message, t)
        for payload in pongs:
            if not c.close_sent:
                self._queue(c, encode_frame(OP_PONG, payload, self._mask()))
        if c.reader.closed is not None:
            if close_reply is not None and not c.close_sent:
                c.close_sent = True
                self._queue(c, encode_frame(OP_CLOSE, close_reply, self._mask()))
                self._write(c)
            self._lost(c, c.reader.closed)

    def _on_text(self, client: int, text: str, t: float) -> None:
        """Deliveries to the sink, acks and errors to the point's send waiting for them."""
        dispatch_frame(text, client, t, self.sink, self._on_answer)

    def _on_answer(self, txn: object, error: Exception | None, t: float) -> None:
        sent = self._pending.pop(txn, None)  # type: ignore[arg-type]
        if sent is not None and self._answer is not None:
            self._answer(sent[1], error, t)

    def _lost(self, c: _Client, reason: CloseReason) -> None:
        """The server closed client c's socket or it broke: its sends awaiting an answer fail."""
        if self._clients.get(c.index) is not c:
            return  # already closed
        self._forget(c)
        failed = [(txn, m) for txn, (client, m) in self._pending.items() if client == c.index]
        for txn, m in failed:
            del self._pending[txn]
            if self._answer is not None:
                self._answer(m, ConnectionError("the sender's WebSocket closed before the answer"), clock())
        self.on_close(c.index, reason)

    def _forget(self, c: _Client) -> None:
        self._clients.pop(c.index, None)
        self._dirty.discard(c)
        try:
            self._selector.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _close_all(self) -> None:
        for c in list(self._clients.values()):
            if not c.close_sent:
                c.close_sent = True
                self._queue(c, encode_frame(OP_CLOSE, (1000).to_bytes(2, "big"), self._mask()))
                self._write(c)
            self._forget(c)

    # -- writing (loop thread)

    def _queue(self, c: _Client, frame: bytes) -> None:
        c.out += frame
        self._dirty.add(c)

    def flush(self) -> None:
        """Writes what was queued since the last flush: one send per client, however many frames."""
        while self._dirty:
            self._write(self._dirty.pop())

    def _write(self, c: _Client) -> None:
        self._dirty.discard(c)
        if c.out:
            try:
                sent = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                if c.index in self._clients:
                    self._lost(c, CloseReason(1006, "connection lost"))
                return
            del c.out[:sent]
        want_write = bool(c.out)
        if want_write != c.writing and c.index in self._clients:
            c.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(c.sock, events, c)

    def send_frame(self, client: int, frame: bytes) -> bool:
        """Queues a text frame's payload on client's socket (written at the next flush); False if
        the socket is not open."""
        c = self._clients.get(client)
        if c is None or c.close_sent:
            return False
        self._queue(c, encode_frame(OP_TEXT, frame, self._mask()))
        return True

    # -- one measured point (loop thread)

    def run_point(self, loop: OpenLoop, send_to: list[tuple[int, str]], drain_s: float) -> None:
        """Walks `loop`'s schedule by the clock; sender s sends on client send_to[s][0]'s socket
        into room send_to[s][1]. Then waits (at most send_timeout_s + 1) for the answers and
        drains (at most drain_s) until every owed delivery arrived."""
        rec = loop.rec
        on_body = rec.on_body
        self.sink = lambda client, body, t: on_body(client, body, t, parse_body)
        self._answer = loop.answered
        self._pending.clear()
        try:
            self._send_schedule(loop, send_to)
            deadline = clock() + loop.send_timeout_s + 1
            while loop.in_flight and (now := clock()) < deadline:
                self.pump(min(0.01, deadline - now))
                loop.expire(clock())
            deadline = clock() + drain_s
            while rec.outstanding > 0 and (now := clock()) < deadline:
                self.pump(min(0.05, deadline - now))
        finally:
            self.sink = None
            self._answer = None
            self._pending.clear()

    def _send_schedule(self, loop: OpenLoop, send_to: list[tuple[int, str]]) -> None:
        while (due := loop.next_due) is not None:
            now = clock()
            loop.expire(now)
            if due > now:
                self.pump(due - now)
                continue
            for m, sender in loop.take_due(now):
                self._start_send(loop, m, *send_to[sender])
            self.flush()

    def _start_send(self, loop: OpenLoop, m: int, client: int, room_id: str) -> None:
        txn = loop.txn(m)
        loop.start(m, clock())
        frame = orjson.dumps({"type": "send", "room_id": room_id, "txn_id": txn, "body": loop.body(m)})
        if self.send_frame(client, frame):
            self._pending[txn] = (client, m)
        else:
            loop.answered(m, ConnectionError("the sender's WebSocket is not open"), clock())


async def run_point_on_loop(events: EventsLoop, plan: Plan, workload: Workload, point: int, *,
                            send_to: list[tuple[int, str]], run_tag: str = "", send_timeout_s: float = 10.0,
                            window: WindowHook | None = None) -> Recorder:
    """engine.run_point for a point driven by `events` (a running EventsLoop): the loop thread does
    all of the point's socket work; this (trio) side only runs `window(t0, t1)` alongside."""
    workload.validate()
    start_at = clock() + 0.2
    rec = Recorder(plan, make_schedule(workload), point, start_at)
    loop = OpenLoop(rec, workload, point, run_tag=run_tag, send_timeout_s=send_timeout_s)
    t_window = measured_window(workload, start_at)
    future = events.submit(lambda: events.run_point(loop, send_to, workload.drain_s))
    window_done = trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_window, window, t_window, window_done)
        await trio.to_thread.run_sync(future.result)
        with trio.move_on_after(max(0.0, t_window[1] - clock()) + 5):
            await window_done.wait()
        nursery.cancel_scope.cancel()
    return rec
