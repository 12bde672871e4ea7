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
