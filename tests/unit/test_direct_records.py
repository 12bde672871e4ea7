"""Reading a direct stream's length-prefixed records (node/adapters/p2p.py, _RecordReader): the
stream hands over bytes in whatever pieces it got them, many records or a part of one."""

from __future__ import annotations

import pytest

from sms.node.adapters.p2p import PeerError, _RecordReader, _StreamEnded


class PiecesStream:
    """A stream that returns the given pieces, one per read, then b"" (ended)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        return self.pieces.pop(0)[:n] if self.pieces else b""


def record(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


async def read_all(reader: _RecordReader, count: int) -> list[bytes]:
    return [await reader.next(1 << 20) for _ in range(count)]


async def test_many_records_in_one_piece_take_one_read():
    bodies = [b"r%d" % i * (i + 1) for i in range(20)]
    stream = PiecesStream([b"".join(record(b) for b in bodies)])
    assert await read_all(_RecordReader(stream), 20) == bodies
    assert stream.reads == 1


async def test_a_record_split_anywhere_comes_out_whole():
    bodies = [b"alpha", b"b" * 3000, b"gamma!"]
    wire = b"".join(record(b) for b in bodies)
    for cut in range(1, len(wire)):
        for size in (1, 3, 7):
            pieces = [wire[:cut]] + [wire[i:i + size] for i in range(cut, len(wire), size)]
            assert await read_all(_RecordReader(PiecesStream(pieces)), 3) == bodies
        if cut > 40:
            break  # the header and the first records' edges are the interesting cuts


async def test_a_stream_that_ends_inside_a_record_says_so():
    reader = _RecordReader(PiecesStream([record(b"whole"), record(b"cut short")[:-3]]))
    assert await reader.next(100) == b"whole"
    with pytest.raises(_StreamEnded):
        await reader.next(100)


@pytest.mark.parametrize("size", [0, 1, 101])
async def test_a_size_out_of_bounds_is_refused_before_its_body_is_read(size):
    stream = PiecesStream([size.to_bytes(4, "big")])
    with pytest.raises(PeerError, match="out of bounds"):
        await _RecordReader(stream).next(100)
    assert stream.reads == 1
