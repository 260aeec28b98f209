"""Byte sources the parsers read from, and a buffered cursor over them.

Every parser reads through ``read_at(offset, size) -> bytes``: backed by ``os.pread`` for
files (no shared seek position, so several threads can read one image), by a bytes object in
tests, or by a forward-only window over a decompressor's output. A short read is never
silently accepted: :class:`Cursor` raises :class:`TruncatedError` with the offset.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ramfs.errors import FormatError, TruncatedError

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Source(Protocol):
    """What a parser needs: positioned reads and, when known, the total size."""

    @property
    def size(self) -> int | None: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


class BytesSource:
    """An in-memory source, for tests and small metadata areas."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self.size = len(self._data)

    def read_at(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


class Cursor:
    """A buffered reading position over a source.

    The page-record scan of a multi-GiB sequential image reads millions of 8-byte headers;
    one ``pread`` each would cost more than the parsing. The cursor pulls chunks and hands
    out slices. ``end`` bounds what may be read (the stream may sit inside a larger file).
    """

    __slots__ = ("read_at", "pos", "end", "chunk", "buf", "buf_start")

    def __init__(self, source: Source, pos: int = 0, end: int | None = None, chunk: int = 1 << 20):
        self.read_at = source.read_at
        self.pos = pos
        self.end = end if end is not None else source.size
        self.chunk = chunk
        self.buf = b""
        self.buf_start = pos

    # -- buffer management -------------------------------------------------------------
    def window(self, want: int) -> tuple[bytes, int]:
        """Return ``(buf, i)`` with ``buf[i:]`` holding up to ``want`` bytes from ``pos``.

        Fewer bytes come back only at the end of the data; callers check the length.
        """
        i = self.pos - self.buf_start
        if 0 <= i and len(self.buf) - i >= want:
            return self.buf, i
        size = max(want, self.chunk)
        if self.end is not None:
            size = max(0, min(size, self.end - self.pos))
        data = self.read_at(self.pos, size) if size else b""
        self.buf = data
        self.buf_start = self.pos
        return data, 0

    def read(self, n: int, what: str) -> bytes:
        buf, i = self.window(n)
        if len(buf) - i < n:
            raise TruncatedError(f"data ends inside {what}: need {n} bytes, have {len(buf) - i}", self.pos)
        self.pos += n
        return buf[i : i + n]

    def skip(self, n: int, what: str) -> None:
        """Move forward ``n`` bytes, checking that they exist without reading them all."""
        if n <= 0:
            return
        target = self.pos + n
        if self.end is not None and target > self.end:
            raise TruncatedError(f"data ends inside {what}: need {n} bytes, have {self.end - self.pos}", self.pos)
        if self.end is None:
            # Unknown length (a stream): the last byte must be readable.
            if len(self.read_at(target - 1, 1)) != 1:
                raise TruncatedError(f"data ends inside {what}", self.pos)
        self.pos = target

    def seek(self, pos: int) -> None:
        self.pos = pos

    def at_end(self) -> bool:
        buf, i = self.window(1)
        return len(buf) - i == 0

    # -- typed fields ------------------------------------------------------------------
    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def be16(self, what: str) -> int:
        v: int = _BE16.unpack(self.read(2, what))[0]
        return v

    def be32(self, what: str) -> int:
        v: int = _BE32.unpack(self.read(4, what))[0]
        return v

    def be64(self, what: str) -> int:
        v: int = _BE64.unpack(self.read(8, what))[0]
        return v

    def peek_u8(self) -> int | None:
        buf, i = self.window(1)
        return buf[i] if len(buf) > i else None

    def name(self, what: str) -> str:
        """A QEMU ``u8 length + bytes`` string (idstrs, section names, capabilities)."""
        start = self.pos
        n = self.u8(f"{what} length")
        raw = self.read(n, what)
        return decode_name(raw, what, start)


def decode_name(raw: bytes, what: str, offset: int) -> str:
    """Decode an idstr-like name. QEMU writes ASCII; anything else is kept reversibly."""
    if b"\0" in raw:
        raise FormatError(f"{what} {raw!r} contains a NUL byte", offset)
    return raw.decode("utf-8", "surrogateescape")


class ForwardSource:
    """``read_at`` over a non-seekable byte stream (a decompressor's output).

    Reads must move forward; the last ``keep`` bytes before the current position stay
    available so a cursor may re-read its window. Skipped bytes are read and dropped
    (or handed to ``tee``, which the decompression cache uses to spool the stream).

    The stream is kept as the chunks it arrived in, not one bytearray: dropping a
    bytearray's front and appending to it makes CPython copy the whole live buffer on
    every growth (~8x the data with a few MiB kept), which was a third of the time of a
    copy into convert/. A read joins only the chunks it spans.
    """

    def __init__(self, read: Callable[[int], bytes], tee: Callable[[int, bytes], None] | None = None,
                 keep: int = 4 << 20):
        self._read = read
        self._tee = tee
        self._keep = keep
        self._chunks: deque[bytes] = deque()
        self._buf_start = 0  # stream offset of _chunks[0]
        self._produced = 0
        self._eof = False
        self.size: int | None = None  # known once the stream has ended

    @property
    def produced(self) -> int:
        return self._produced

    def _pull(self, upto: int) -> None:
        while not self._eof and self._produced < upto:
            data = self._read(max(1 << 20, upto - self._produced))
            if not data:
                self._eof = True
                self.size = self._produced
                break
            if self._tee is not None:
                self._tee(self._produced, data)
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._produced += len(data)

    def _drop_before(self, offset: int) -> None:
        chunks = self._chunks
        while chunks and self._buf_start + len(chunks[0]) <= offset:
            self._buf_start += len(chunks.popleft())

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < self._buf_start:
            raise FormatError("internal: backward read on a compressed stream", offset)
        self._pull(offset + size)
        # Drop what lies well before the request so memory stays bounded.
        self._drop_before(offset - self._keep)
        pos = self._buf_start
        parts: list[bytes] = []
        want_end = offset + size
        for chunk in self._chunks:
            end = pos + len(chunk)
            if end > offset:
                a = max(0, offset - pos)
                b = min(len(chunk), want_end - pos)
                if a == 0 and b == len(chunk) and not parts and end >= want_end:
                    return chunk
                parts.append(chunk[a:b] if (a, b) != (0, len(chunk)) else chunk)
                if end >= want_end:
                    break
            pos = end
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def drain(self) -> int:
        """Read the stream to its end (for the tee); returns the total length."""
        while not self._eof:
            self._pull(self._produced + (8 << 20))
            self._drop_before(self._produced - self._keep)
        return self._produced
