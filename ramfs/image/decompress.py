"""Streaming decompression of libvirt's compressed save formats (codes 1..5).

libvirt pipes the QEMU stream through ``<prog> -c`` on save and ``<prog> -dc`` on restore
(qemu_saveimage.c ``qemuSaveImageGetCompressionCommand``). We use the stdlib for gzip, bzip2
and xz, the ``zstandard`` module for zstd, and the ``lzop`` program for lzop, as libvirt does
(there is no maintained Python lzo module that reads lzop's container).
"""

from __future__ import annotations

import bz2
import errno
import io
import lzma
import os
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol, Self, TypeAlias, cast

import zstandard

from ramfs.errors import CacheError, FormatError, UnsupportedError
from ramfs.format.libvirt import SaveFormat

_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError, ValueError)

#: The compressed bytes: a binary file object (an open file, or a stream without a descriptor).
RawFile: TypeAlias = io.RawIOBase | io.BufferedIOBase


class _Stream(Protocol):
    """A decompressed stream: the gzip, bz2, xz and zstd readers, or lzop's stdout."""

    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Codec:
    """One of libvirt's compressions: the program libvirt pipes the stream through
    (``<program> -c`` on save, ``-dc`` on restore; also what ``ramfs export`` runs), and the
    Python reader ramfs decompresses with (None: the program's ``-dc`` as a subprocess)."""

    program: str
    reader: Callable[[RawFile, Decompressor], _Stream] | None


def _xz(raw: RawFile, d: Decompressor) -> _Stream:
    # LZMAFile takes any binary file object (typeshed says IO[bytes]).
    return lzma.LZMAFile(cast("IO[bytes]", raw), "rb", format=lzma.FORMAT_XZ)


def _zstd(raw: RawFile, d: Decompressor) -> _Stream:
    d._framing = _ZstdFraming()
    # zstandard only calls read() on its source.
    return zstandard.ZstdDecompressor().stream_reader(
        cast("IO[bytes]", _Tee(raw, d._framing.feed)), read_across_frames=True)


#: Every compression ramfs reads, by libvirt's format code: adding one is one row here (and
#: its code in :class:`ramfs.format.libvirt.SaveFormat`). lzop has its program: no maintained
#: Python module reads lzop's container.
CODECS: dict[SaveFormat, Codec] = {
    SaveFormat.GZIP: Codec("gzip", lambda raw, d: _GzipMembers(raw)),
    SaveFormat.BZIP2: Codec("bzip2", lambda raw, d: bz2.BZ2File(raw, "rb")),
    SaveFormat.XZ: Codec("xz", _xz),
    SaveFormat.LZOP: Codec("lzop", None),
    SaveFormat.ZSTD: Codec("zstd", _zstd),
}


class Decompressor:
    """``read(n)`` over the decompressed stream of a file region; errors become FormatError."""

    def __init__(self, path: str | None, offset: int, fmt: SaveFormat, fileobj: RawFile | None = None):
        """Decompress ``path`` from ``offset``, or the file-like ``fileobj`` from where it is."""
        self.fmt = fmt
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._raw: RawFile
        if fileobj is None:
            assert path is not None, "Decompressor needs a path or a fileobj"
            self._raw = open(path, "rb")
            self._raw.seek(offset)
        else:
            self._raw = fileobj
        self._stream: _Stream | None = None
        self._framing: _ZstdFraming | None = None
        try:
            codec = CODECS.get(fmt)
            if codec is None:
                raise FormatError(f"format {fmt.label} is not compressed")
            if codec.reader is not None:
                self._stream = codec.reader(self._raw, self)
            else:
                self._start_program(codec.program)
        except BaseException:
            self.close()
            raise

    def _start_program(self, name: str) -> None:
        prog = shutil.which(name)
        if prog is None:
            raise UnsupportedError(f"{name}-compressed image, but the {name} program is not installed")
        raw_fd: int | None
        try:
            raw_fd = self._raw.fileno()
        except (AttributeError, OSError, ValueError):
            raw_fd = None
        self._proc = subprocess.Popen([prog, "-dc", "--ignore-warn"] if name == "lzop" else [prog, "-dc"],
                                      stdin=raw_fd if raw_fd is not None else subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if raw_fd is None:
            # A stream without a descriptor (a copy arriving through FUSE): feed the program.
            self._feeder = threading.Thread(target=self._feed, daemon=True)
            self._feeder.start()
        self._stream = self._proc.stdout

    def _feed(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None  # lzop started with stdin=PIPE
        stdin = self._proc.stdin
        try:
            while data := self._raw.read(1 << 20):
                stdin.write(data)
        except (OSError, ValueError):
            pass  # lzop exited early; its status tells why
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def read(self, n: int) -> bytes:
        assert self._stream is not None  # set by __init__ (or it raised)
        try:
            data = self._stream.read(n)
        except _ERRORS as e:
            raise FormatError(f"corrupt {self.fmt.label} data in the image: {e}") from None
        if not data and self._framing is not None:
            why = self._framing.finish()
            if why:
                raise FormatError(f"the zstd stream {why}: the image is truncated")
        if not data and self._proc is not None:
            self._proc.wait()
            assert self._proc.stderr is not None  # stderr=PIPE
            err = self._proc.stderr.read().decode(errors="replace").strip()
            if self._proc.returncode != 0:
                raise FormatError(f"corrupt {self.fmt.label} data in the image: {self.fmt.label} says "
                                  f"{err or 'error'}")
        return data

    def close(self) -> None:
        for closer in (self._stream, self._raw):
            try:
                if closer is not None:
                    closer.close()
            except _ERRORS:
                pass
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._proc.stderr is not None:  # stderr=PIPE: always
                self._proc.stderr.close()
            if self._feeder is not None:
                self._feeder.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tee:
    """A file object whose reads are also shown to ``seen``."""

    def __init__(self, raw: RawFile, seen: Callable[[bytes], None]):
        self._raw = raw
        self._seen = seen

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._seen(data)
        return data


class _ZstdFraming:
    """Follows the frame structure of a zstd stream as its bytes go by (RFC 8878 §3.1:
    frame header, blocks up to the one marked last, optional checksum; skippable frames), so
    that the end of the input can be told from the end of a frame. zstandard's stream reader
    returns what it has of a cut frame and says nothing; ``zstd -dc`` fails. Only headers
    are looked at, a few bytes at a time: no memory beyond them, whatever the stream holds."""

    MAGIC = 0xFD2FB528
    SKIPPABLE = 0x184D2A50  # ... 0x184D2A5F

    def __init__(self) -> None:
        self._need = 4  # bytes the current header field needs
        self._buf = bytearray()
        self._skip = 0  # bytes of content to pass over
        self._state = "magic"
        self._checksum = 0
        self._padding = False

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                k = min(self._skip, n - pos)
                self._skip -= k
                pos += k
                if not self._skip and self._state == "content":
                    self._after_block()
                continue
            if self._padding:
                if data[pos:].strip(b"\0"):
                    self._padding = False  # not padding after all: the decoder will say so
                    self._state = "junk"
                return
            k = min(self._need - len(self._buf), n - pos)
            self._buf += data[pos:pos + k]
            pos += k
            if len(self._buf) == self._need:
                self._field(bytes(self._buf))
                self._buf.clear()

    def _field(self, b: bytes) -> None:
        st = self._state
        if st == "magic":
            magic = int.from_bytes(b, "little")
            if magic == self.MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == self.SKIPPABLE:
                self._state, self._need = "skipsize", 4
            elif b == bytes(4):
                self._padding = True
                self._state, self._need = "magic", 4
            else:
                self._state = "junk"
        elif st == "skipsize":
            self._skip = int.from_bytes(b, "little")
            self._state, self._need = "magic", 4
        elif st == "fhd":
            d = b[0]
            fcs = (0, 2, 4, 8)[d >> 6]
            single = d >> 5 & 1
            if single and fcs == 0:
                fcs = 1
            self._checksum = 4 if d >> 2 & 1 else 0
            rest = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + fcs
            self._state, self._need = ("fh", rest) if rest else ("block", 3)
        elif st == "fh":
            self._state, self._need = "block", 3
        elif st == "block":
            h = int.from_bytes(b, "little")
            self._last = h & 1
            kind, size = h >> 1 & 3, h >> 3
            self._skip = 1 if kind == 1 else size
            self._state = "content"
            if not self._skip:
                self._after_block()
        elif st == "checksum":
            self._state, self._need = "magic", 4

    def _after_block(self) -> None:
        if not self._last:
            self._state, self._need = "block", 3
        elif self._checksum:
            self._state, self._need = "checksum", self._checksum
        else:
            self._state, self._need = "magic", 4

    def finish(self) -> str | None:
        """None if the input ended between frames (or in zero padding); else where it ended."""
        if self._state == "junk":
            return None  # not zstd framing: the decoder reports that itself
        if self._padding or (self._state == "magic" and not self._buf and not self._skip):
            return None
        return "ends inside a frame" if self._state != "magic" else "ends inside a skippable frame"


class _GzipMembers:
    """gzip members one after another, like ``gzip -dc``, skipping zero padding between and
    after them in C (Python's gzip module steps over it a byte per call: minutes per GiB)."""

    CHUNK = 1 << 20

    def __init__(self, raw: RawFile):
        self._raw = raw
        self._d = zlib.decompressobj(31)
        self._pending = b""
        self._eof = False
        self._started = False
        self._out = b""

    def read(self, n: int) -> bytes:
        if self._out:
            data, self._out = self._out[:n], self._out[n:]
            return data
        out = self._decompress(max(n, self.CHUNK))
        data, self._out = out[:n], out[n:]
        return data

    def _decompress(self, n: int) -> bytes:
        while not self._eof:
            # After a member's end zlib may leave a stale unconsumed_tail: what follows the
            # member is unused_data (kept in _pending), never the tail again.
            if not self._d.eof and self._d.unconsumed_tail:
                out = self._d.decompress(self._d.unconsumed_tail, n)
            else:
                data = self._pending or self._raw.read(self.CHUNK)
                self._pending = b""
                if not data:
                    if self._started and not self._d.eof:
                        raise EOFError("compressed file ended before the end-of-stream marker")
                    self._eof = True
                    break
                if self._d.eof or not self._started:
                    data = data.lstrip(b"\0") if self._started else data
                    if not data:
                        self._skip_hole()
                        continue
                    self._d = zlib.decompressobj(31)
                    self._started = True
                out = self._d.decompress(data, n)
            if self._d.eof:
                # The rest belongs to the next member (or is padding).
                self._pending = self._d.unused_data
            if out:
                return out
        return b""

    def _skip_hole(self) -> None:
        """Between or after members, zero padding that is a hole of a sparse file is jumped
        over (SEEK_DATA) instead of read: a terabyte hole would take minutes."""
        try:
            fd = self._raw.fileno()
            pos = self._raw.tell()
        except (AttributeError, OSError, ValueError):
            return  # a pipe: nothing to skip
        try:
            nxt = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left: the end
                self._raw.seek(0, os.SEEK_END)
            return
        if nxt > pos:
            self._raw.seek(nxt)

    def close(self) -> None:
        self._raw.close()


class SparseSpool:
    """Writes a stream to a file, leaving all-zero 4 KiB blocks as holes."""

    BLOCK = 4096

    def __init__(self, fd: int):
        self.fd = fd
        self.size = 0
        self._zero = bytes(self.BLOCK)

    def write_at(self, offset: int, data: bytes) -> None:
        try:
            self._write_at(offset, data)
        except OSError as e:
            raise CacheError(f"cannot write the decompression cache: {e.strerror}") from None

    def _write_at(self, offset: int, data: bytes) -> None:
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        bs = self.BLOCK
        # Unaligned head goes out as is.
        head = (-offset) % bs
        run_start = None
        if head:
            os.pwrite(self.fd, mv[: min(head, n)], offset)
            pos = min(head, n)
        while pos < n:
            piece = mv[pos : pos + bs]
            if len(piece) == bs and piece == self._zero:
                if run_start is not None:
                    os.pwrite(self.fd, mv[run_start:pos], offset + run_start)
                    run_start = None
            elif run_start is None:
                run_start = pos
            pos += bs
        if run_start is not None:
            os.pwrite(self.fd, mv[run_start:n], offset + run_start)
        self.size = max(self.size, offset + n)

    def finish(self) -> None:
        os.ftruncate(self.fd, self.size)

