"""Writes sent at once (node/adapters/sendnow.py) on real sockets: whole when the kernel takes
them, the rest through trio in order when it does not, trio's errors when the socket is gone."""

from __future__ import annotations

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream

from sms.node.adapters import p2p  # noqa: F401 - installs the libp2p write path
from sms.node.adapters.sendnow import raw_socket, send_now


async def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, "the stream ended early"
        got += chunk
    return bytes(got)


async def test_a_write_the_kernel_takes_whole_is_sent_at_once():
    a, b = await socket_streams()
    sent = send_now(raw_socket(a), b"hello")
    assert sent == 5
    assert await read_exactly(b, 5) == b"hello"


async def test_a_full_socket_takes_part_or_nothing_and_never_raises():
    a, b = await socket_streams()
    sock = raw_socket(a)
    total = 0
    for _ in range(10_000):
        n = send_now(sock, b"x" * 65536)
        total += n
        if n < 65536:
            break
    else:
        raise AssertionError("the socket never filled")
    assert send_now(sock, b"y") == 0  # full: nothing taken, no error
    assert total > 0
    await b.aclose()
    await a.aclose()


async def test_a_closed_socket_takes_nothing_and_trio_reports_it():
    a, _ = await socket_streams()
    sock = raw_socket(a)
    await a.aclose()
    assert send_now(sock, b"late") == 0
    try:
        await a.send_all(b"late")
    except trio.ClosedResourceError:
        pass
    else:
        raise AssertionError("trio accepted a write on a closed stream")


async def test_other_streams_always_go_through_trio():
    assert raw_socket(object()) is None
    assert send_now(None, b"data") == 0


async def test_libp2p_writes_larger_than_the_socket_buffer_arrive_whole_and_in_order():
    """Two writers, each write several times the kernel's buffer: the part the kernel does not
    take at once goes through trio under the write lock, so no other write lands in between."""
    assert TrioTCPStream._sms_sends_now  # the path under test is the installed one
    a, b = await socket_streams()
    tcp = TrioTCPStream(a)
    size = 4 * 1024 * 1024
    writes = [bytes([i]) * size for i in range(1, 5)]

    async def writer(chunks: list[bytes]) -> None:
        for chunk in chunks:
            await tcp.write(chunk)

    received = bytearray()

    async def reader() -> None:
        while len(received) < size * len(writes):
            received.extend(await b.receive_some(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer, writes[:2])
            nursery.start_soon(writer, writes[2:])
    # Each write is one run of its own byte value: none was split by another.
    runs = [received[i * size:(i + 1) * size] for i in range(len(writes))]
    order = [run[0] for run in runs]
    assert sorted(order) == [1, 2, 3, 4]
    for run in runs:
        assert run == bytes([run[0]]) * size
    assert order.index(1) < order.index(2) and order.index(3) < order.index(4)  # each writer's order


async def test_libp2p_write_on_a_reset_connection_is_connection_closed():
    a, b = await socket_streams()
    tcp = TrioTCPStream(a)
    await b.aclose()
    with trio.fail_after(10):
        try:
            for _ in range(1000):  # the first writes may still land in the kernel's buffer
                await tcp.write(b"z" * 65536)
        except ConnectionClosedError:
            return
    raise AssertionError("writes to a closed peer never failed")


async def accepted_events_socket() -> tuple["EventsSocket", trio.SocketStream, bytes]:
    from sms.node.adapters.wsserver import EventsSocket, Headers, Request

    server, client = await socket_streams()
    request = Request("GET", "/v1/events", "HTTP/1.1", Headers({"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}))
    ws = EventsSocket(server, request)
    await ws.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += await client.receive_some(4096)
    return ws, client, head.split(b"\r\n\r\n", 1)[1]


async def test_events_socket_writes_at_once_and_owes_the_rest_in_order_when_the_kernel_is_full():
    """write_now, as the hub's delivering task calls it: frames go out whole and in order, also
    when the kernel takes only part of one (the rest is owed, and goes before any later write)."""
    from sms.node.adapters.wscodec import OP_TEXT, MessageReader

    ws, client, leftover = await accepted_events_socket()
    sent: list[str] = []
    i = 0
    while not ws.owes_bytes:  # nobody reads yet: the kernel's buffer fills
        assert ws.can_write_now()
        text = f'{{"n":{i},"pad":"{"x" * 3000}"}}'
        ws.write_now(text.encode())
        sent.append(text)
        i += 1
        assert i < 100_000, "the socket never filled"
    assert not ws.can_write_now()  # owed bytes go first: no more writes at once
    reader = MessageReader()
    got: list[str] = [p for op, p in reader.feed(leftover) if op == OP_TEXT]

    async def read_all() -> None:
        while len(got) < len(sent) + 1:
            data = await client.receive_some(1 << 16)
            assert data, "the socket closed early"
            got.extend(p for op, p in reader.feed(data) if op == OP_TEXT)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await ws.send({"type": "websocket.send", "text": "after"})  # writes what is owed first
    assert got == sent + ["after"]
    assert not ws.owes_bytes and ws.can_write_now()


async def test_events_socket_flush_writes_what_is_owed_and_reports_a_lost_client():
    from starlette.websockets import WebSocketDisconnect

    ws, client, _ = await accepted_events_socket()
    while not ws.owes_bytes:
        ws.write_now(b'{"pad":"' + b"y" * 60000 + b'"}')
    await client.aclose()  # the client is gone: what is owed cannot be written
    with trio.fail_after(10):
        try:
            await ws.flush()
        except WebSocketDisconnect:
            return
    raise AssertionError("flush to a closed client did not report it")
