"""benchmarks/wsloop.py's selectors loop against a small RFC 6455 server written here on
127.0.0.1 sockets (one thread per connection): the handshake, bytes that come with the 101,
pings, a point's acks, error events and silent sends, deliveries to the other clients, and a
server close failing the sends that wait on that socket. (The real sms nodes drive it in
tests/cluster/test_bench_wsloop_node.py and test_bench_run.py.)"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from sms.benchmarks.engine import OpenLoop
from sms.benchmarks.recorder import Recorder
from sms.benchmarks.schedule import Workload, client_plan, make_schedule
from sms.benchmarks.wsloop import EventsLoop, MaskKeys, open_events_socket
from sms.benchmarks.wsmini import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, accept_key, encode_frame


def text(obj: dict) -> bytes:
    return encode_frame(OP_TEXT, json.dumps(obj).encode())


class Server:
    """Answers send frames by their message number m (txn "...m<m>"): m % 5 == 3 never, m % 5 == 4
    with an error event, else an ack to the sender (in a batch) and the body to every other client.
    With `close_sender_after` k, closes the sender's socket (1001) on its k-th send frame."""

    def __init__(self, close_sender_after: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.pongs: list[bytes] = []
        self.closes: list[bytes] = []
        self.unmasked: list[int] = []       # opcodes of client frames that were not masked
        self.sends = 0
        self.close_sender_after = close_sender_after
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/events?token=t&batch=1"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def write(self, conn: socket.socket, data: bytes) -> None:
        with self.lock:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        key = next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
                   if line.lower().startswith("sec-websocket-key"))
        with self.lock:
            self.conns.append(conn)
        # the 101 and, in the same write, an event and a ping: they arrive as the handshake's leftover
        self.write(conn, (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode()
                   + text({"type": "message", "body": "welcome"}) + encode_frame(OP_PING, b"are you there"))
        parser = FrameParser()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not data[1] & 0x80:
                self.unmasked.append(data[0] & 0x0F)
            for _, op, payload in parser.feed(data):
                if op == OP_PONG:
                    self.pongs.append(payload)
                elif op == OP_CLOSE:
                    self.closes.append(payload)
                elif op == OP_TEXT:
                    self._answer(conn, json.loads(payload))

    def _answer(self, conn: socket.socket, frame: dict) -> None:
        self.sends += 1
        if self.close_sender_after is not None and self.sends >= self.close_sender_after:
            self.write(conn, encode_frame(OP_CLOSE, (1001).to_bytes(2, "big") + b"going away"))
            return
        txn = frame["txn_id"]
        m = int(txn.rpartition("m")[2])
        if m % 5 == 3:
            return
        if m % 5 == 4:
            self.write(conn, text({"type": "error", "txn_id": txn, "status": 429, "error": {"code": "rate_limited"}}))
            return
        self.write(conn, text({"type": "batch", "events": [{"type": "ack", "txn_id": txn}]}))
        for other in list(self.conns):
            if other is not conn:
                self.write(other, text({"type": "batch", "events": [{"type": "message", "body": frame["body"]}]}))

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


WORKLOAD = Workload(clients=3, senders=1, rooms=1, rate=100, duration_s=0.3, warmup_s=0, drain_s=0.5)


def connected_loop(server: Server, delivered: list, closed: list) -> EventsLoop:
    loop = EventsLoop(on_close=lambda c, reason: closed.append((c, reason.code)))
    loop.sink = lambda c, body, t: delivered.append((c, body))
    for c in range(WORKLOAD.clients):
        sock, leftover = open_events_socket(server.url(), timeout_s=5)
        loop.add(c, sock, leftover)
    loop.start()
    return loop


def run_point(loop: EventsLoop, point: int) -> Recorder:
    plan = client_plan(WORKLOAD, nodes=1)   # clients 0, 1, 2 in room 0; client 0 sends
    rec = Recorder(plan, make_schedule(WORKLOAD), point, time.monotonic() + 0.05)
    openloop = OpenLoop(rec, WORKLOAD, point, run_tag="t", send_timeout_s=0.3)
    loop.submit(lambda: loop.run_point(openloop, [(0, "room-0")], WORKLOAD.drain_s)).result(timeout=10)
    return rec


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_a_point_counts_acks_errors_timeouts_and_deliveries(server: Server) -> None:
    delivered: list = []
    closed: list = []
    loop = connected_loop(server, delivered, closed)
    try:
        wait_for(lambda: len(server.pongs) == 3)   # the ping that came with each 101
        assert server.pongs == [b"are you there"] * 3
        assert sorted(delivered) == [(0, "welcome"), (1, "welcome"), (2, "welcome")]
        frames_before = loop.frames
        rec = run_point(loop, point=1)
        s = rec.summary(WORKLOAD.duration_s, cdf=0)
        assert s["sent"] == 30
        assert s["error_kinds"] == {"timeout": 6, "http_429": 6}
        assert s["acked"] == 18 and s["delivered"] == 18 * 2 and s["lost"] == 0 and s["duplicates"] == 0
        assert loop.frames - frames_before == 18 + 6 + 18 * 2   # acks, errors, one frame per delivery
        assert loop.sink is None and not server.unmasked and closed == []
    finally:
        loop.stop()
    wait_for(lambda: len(server.closes) == 3)
    assert server.closes == [(1000).to_bytes(2, "big")] * 3


def test_a_server_close_fails_the_senders_waiting_sends_and_is_reported() -> None:
    server = Server(close_sender_after=4)
    delivered: list = []
    closed: list = []
    loop = connected_loop(server, delivered, closed)
    try:
        rec = run_point(loop, point=2)
        s = rec.summary(WORKLOAD.duration_s, cdf=0)
        # m = 0, 1, 2 are acked; the 4th send frame (m = 3) makes the server close with 1001: m = 3
        # was waiting and fails, and every later send finds the socket closed
        assert s["sent"] == 30 and s["acked"] == 3
        assert s["error_kinds"] == {"ConnectionError": 27}
        assert closed == [(0, 1001)] and not loop.is_open(0) and loop.is_open(1)
        assert server.closes[:1] == [(1001).to_bytes(2, "big")]   # the close was echoed
    finally:
        loop.stop()
        server.close()


def test_mask_keys_are_four_random_bytes_and_refill() -> None:
    keys = MaskKeys(batch=8)
    got = [keys.next() for _ in range(6)]   # three refills of two keys each
    assert all(len(k) == 4 for k in got)
    assert len(set(got)) == 6               # 2**-32 per pair to collide: random keys do not repeat
