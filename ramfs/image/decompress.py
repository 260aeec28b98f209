"""Streaming decompression of libvirt's compressed save formats (codes 1..5).

libvirt pipes the QEMU stream through ``<prog> -c`` on save and ``<prog> -dc`` on restore
(qemu_saveimage.c ``qemuSaveImageGetCompressionCommand``). We use the stdlib for gzip, bzip2
and xz, the ``zstandard`` module for zstd, and the ``lzop`` program for lzop, as libvirt does
(there is no maintained Python lzo module that reads lzop's container).
"""

from __future__ import annotations

import bz2
import errno
import lzma
import os
import shutil
import subprocess
import threading
import zlib
import zstandard

from ramfs.errors import CacheError, FormatError, UnsupportedError
from ramfs.format.libvirt import SaveFormat

_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError, ValueError)


class Decompressor:
    """``read(n)`` over the decompressed stream of a file region; errors become FormatError."""

    def __init__(self, path: str | None, offset: int, fmt: SaveFormat, fileobj=None):
        """Decompress ``path`` from ``offset``, or the file-like ``fileobj`` from where it is."""
        self.fmt = fmt
        self._proc: subprocess.Popen | None = None
        self._feeder: threading.Thread | None = None
        if fileobj is None:
            self._raw = open(path, "rb")
            self._raw.seek(offset)
        else:
            self._raw = fileobj
        self._stream = None
        try:
            if fmt == SaveFormat.GZIP:
                self._stream = _GzipMembers(self._raw)
            elif fmt == SaveFormat.BZIP2:
                self._stream = bz2.BZ2File(self._raw, "rb")
            elif fmt == SaveFormat.XZ:
                self._stream = lzma.LZMAFile(self._raw, "rb", format=lzma.FORMAT_XZ)
            elif fmt == SaveFormat.ZSTD:
                self._stream = _ZstdFrames(self._raw)
            elif fmt == SaveFormat.LZOP:
                prog = shutil.which("lzop")
                if prog is None:
                    raise UnsupportedError("lzop-compressed image, but the lzop program is not installed")
                has_fd = True
                try:
                    self._raw.fileno()
                except (AttributeError, OSError, ValueError):
                    has_fd = False
                self._proc = subprocess.Popen([prog, "-dc", "--ignore-warn"],
                                              stdin=self._raw if has_fd else subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                if not has_fd:
                    # A stream without a descriptor (a copy arriving through FUSE): feed lzop.
                    self._feeder = threading.Thread(target=self._feed, daemon=True)
                    self._feeder.start()
                self._stream = self._proc.stdout
            else:
                raise FormatError(f"format {fmt.label} is not compressed")
        except BaseException:
            self.close()
            raise

    def _feed(self) -> None:
        try:
            while data := self._raw.read(1 << 20):
                self._proc.stdin.write(data)
        except (OSError, ValueError):
            pass  # lzop exited early; its status tells why
        finally:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def read(self, n: int) -> bytes:
        try:
            data = self._stream.read(n)
        except _ERRORS as e:
            raise FormatError(f"corrupt {self.fmt.label} data in the image: {e}") from None
        if not data and self._proc is not None:
            self._proc.wait()
            err = self._proc.stderr.read().decode(errors="replace").strip()
            if self._proc.returncode != 0:
                raise FormatError(f"corrupt lzop data in the image: lzop says {err or 'error'}")
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
            self._proc.stderr.close()
            if self._feeder is not None:
                self._feeder.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ZstdFrames:
    """zstd frames one after another, like ``zstd -dc``, with the end of each frame seen:
    input that stops inside a frame is a truncated image, not a shorter stream (zstandard's
    stream reader returns what it has and says nothing). Zeros after the last frame are
    padding."""

    CHUNK = 1 << 20

    def __init__(self, raw):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None  # the frame being decompressed
        self._pending = b""  # input read past the end of the last frame
        self._out = bytearray()
        self._done = False

    def read(self, n: int) -> bytes:
        while len(self._out) < n and not self._done:
            data = self._pending or self._raw.read(self.CHUNK)
            self._pending = b""
            if not data:
                if self._obj is not None:
                    raise FormatError("the zstd stream ends inside a frame: the image is truncated")
                self._done = True
                break
            if self._obj is None:
                if not data.strip(b"\0"):
                    self._skip_padding()
                    break
                self._obj = self._dctx.decompressobj()
            self._out += self._obj.decompress(data)
            if self._obj.eof:
                self._pending = self._obj.unused_data
                self._obj = None
        out = bytes(self._out[:n])
        del self._out[:n]
        return out

    def _skip_padding(self) -> None:
        while data := self._raw.read(self.CHUNK):
            if data.strip(b"\0"):
                raise FormatError("data after zero padding at the end of the zstd stream")
        self._done = True

    def close(self) -> None:
        self._obj = None


class _GzipMembers:
    """gzip members one after another, like ``gzip -dc``, skipping zero padding between and
    after them in C (Python's gzip module steps over it a byte per call: minutes per GiB)."""

    CHUNK = 1 << 20

    def __init__(self, raw):
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

