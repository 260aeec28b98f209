"""Sequential -> mapped-ram conversion, streaming: the source is read once, in order.

The input is any save image ramfs reads, given as a byte stream (a file, or the bytes of a
``cp`` arriving through FUSE): libvirt-wrapped or bare, raw or compressed (decompressed on the
fly). The output is what QEMU 10 writes with capability ``mapped-ram`` and libvirt 11.3 calls
format 6 ("sparse"): see docs/formats.md, "Conversion". An input that is already mapped-ram is
stored as it is, holes kept. Memory stays bounded by the bitmaps (and a bounded device-state
tail), never by the image size.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ramfs.errors import FormatError, ImageIOError, NotAnImageError, RamfsError, UnsupportedError
from ramfs.format import encode
from ramfs.format.libvirt import (LIBVIRT_HEADER_SIZE, QEMU_SAVE_PARTIAL, LibvirtHeader, SaveFormat,
                                  is_libvirt_magic, parse_header)
from ramfs.format.qcow2 import is_qcow2
from ramfs.format.qemu import (CAP_MAPPED_RAM, CAP_X_IGNORE_SHARED, MigCmd, RamSetup, SectionPiece, SectionType,
                               StreamLayout, is_qemu_magic, parse_stream, parse_stream_kept)
from ramfs.format.source import ForwardSource
from ramfs.image.files import FileSource
from ramfs.publish import NewFile, reopen_direct
from ramfs.convert.writer import BlockLayout, MappedRamWriter, plan_blocks

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from ramfs.image.decompress import Decompressor
    from ramfs.image.qcow2 import VmstateSource

COPY_CHUNK = 1 << 20
_ZERO_BLOCK = bytes(4096)

Progress = Callable[[int], None]  # bytes of input consumed so far


class SeekableInput(Protocol):
    """A ``read_at`` source over the same bytes as the input stream: the regular file (a
    :class:`~ramfs.image.files.FileSource`) or a qcow2 snapshot's VM state."""

    @property
    def size(self) -> int: ...

    @property
    def fd(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class ConvertResult:
    container: str  # "libvirt" or "bare"
    source_format: str  # libvirt format label, or "qemu"
    already_sparse: bool  # stored as it was
    pages_written: int
    zero_pages: int
    size: int  # logical size of the output
    seconds: float
    populated: tuple[int, ...] = ()  # per block: pages whose final content is not zero
    source_warnings: tuple[str, ...] = ()  # what the reader says of the source stream


class _Input:
    """The input stream with a count of bytes consumed (for progress)."""

    def __init__(self, read: Callable[[int], bytes], progress: Progress | None):
        self._read = read
        self.pos = 0
        self.progress = progress
        self._pending = b""
        self.seekable: SeekableInput | None = None  # over the same bytes, when the input is a file

    def read(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            self.pos += len(data)
            return data
        data = self._read(n)
        self.pos += len(data)
        if self.progress is not None:
            self.progress(self.pos)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.read(min(n - len(out), COPY_CHUNK))
            if not chunk:
                raise FormatError(f"input ends inside {what} ({len(out)} of {n} bytes)", self.pos)
            out += chunk
        return bytes(out)

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending
        self.pos -= len(data)


class _FileLike(io.RawIOBase):
    """A read-only file object over ``_Input`` for the decompressors."""

    def __init__(self, src: _Input):
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b)
        data = self.src.read(len(view))
        view[: len(data)] = data
        return len(data)


def convert_stream(read: Callable[[int], bytes], fd: int, *, jobs: int = 1, direct_fd: int | None = None,
                   progress: Progress | None = None, seekable: SeekableInput | None = None,
                   padding: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert the image whose bytes ``read`` returns into the empty file ``fd``.

    ``seekable``, when the input is a regular file, is a ``read_at`` source over the same
    bytes: an uncompressed stream is then parsed straight from it (no copying through a
    stream window) and its device state read back by offset. ``padding(start, end)`` is told
    where the input has bytes that can only be zeros (libvirt's padding after the XML).

    On success the file holds a complete image (libvirt's ``LibvirtQemudSave`` magic written
    last, after an fsync); on failure it holds garbage and the caller removes it.
    """
    t0 = time.monotonic()
    src = _Input(read, progress)
    src.seekable = seekable
    head = src.read_exact(4, "the first bytes")
    if head == b"Libv":
        head += src.read_exact(LIBVIRT_HEADER_SIZE - 4, "the libvirt header")
        if not is_libvirt_magic(head):
            raise NotAnImageError("not a save image (bad libvirt magic)")
        return _convert_libvirt(src, head, fd, jobs, direct_fd, t0, padding)
    if is_qemu_magic(head):
        src.unread(head)
        return _convert_qemu(src, fd, 0, None, jobs, direct_fd, t0, "bare", "qemu")
    if is_qcow2(head):
        raise NotAnImageError("a qcow2 disk, not a save image: convert one of its snapshots (--snapshot NAME)")
    raise NotAnImageError("not a save image (neither a libvirt header nor a QEMU stream)")


def _convert_libvirt(src: _Input, raw_header: bytes, fd: int, jobs: int, direct_fd: int | None, t0: float,
                     padding: Callable[[int, int], None] | None = None) -> ConvertResult:
    if raw_header[:16] == QEMU_SAVE_PARTIAL:
        raise FormatError("incomplete save image: libvirt never finished writing it (magic LibvirtQemudPart)", 0)
    h = parse_header(raw_header)
    if padding is not None:
        # The XML (and cookie) come first; what follows up to the stream is zero padding.
        padding(LIBVIRT_HEADER_SIZE + max(h.cookie_offset, 1), LIBVIRT_HEADER_SIZE + h.data_len)
    data_area = src.read_exact(h.data_len, "the libvirt data area (domain XML)")
    fmt = h.effective_format
    if fmt == SaveFormat.SPARSE:
        _pwrite_all(fd, raw_header + data_area, 0)
        size = _copy_sparse(src, fd, LIBVIRT_HEADER_SIZE + h.data_len)
        return ConvertResult("libvirt", fmt.label, True, 0, 0, size, time.monotonic() - t0)
    # Part magic until the image is complete, as libvirt's virQEMUSaveDataWrite does.
    _pwrite_all(fd, encode.libvirt_header(h, raw_header, format=SaveFormat.SPARSE, complete=False)
                + data_area, 0)
    stream: _Input | Decompressor = src
    dec = None
    if fmt.compressed:
        from ramfs.image.decompress import Decompressor
        dec = Decompressor(None, 0, fmt, fileobj=_FileLike(src))
        stream = dec
    try:
        result = _convert_qemu(stream, fd, h.stream_offset, h, jobs, direct_fd, t0, "libvirt", fmt.label)
    finally:
        if dec is not None:
            dec.close()
    return result


def _convert_qemu(stream: _Input | Decompressor, fd: int, base: int, lv_header: LibvirtHeader | None,
                  jobs: int, direct_fd: int | None, t0: float, container: str,
                  source_format: str) -> ConvertResult:
    # Peek at the configuration: a mapped-ram stream is stored as it is.
    first = b""
    while len(first) < 4096 and (chunk := stream.read(4096 - len(first))):
        first += chunk
    # An uncompressed file is parsed straight from the file (see convert_stream).
    seekable = stream.seekable if isinstance(stream, _Input) else None
    progress = stream.progress if isinstance(stream, _Input) else None
    if len(first) >= 4 and is_qemu_magic(first):
        probe = _peek_caps(first)
        if probe is not None and CAP_MAPPED_RAM in probe:
            if lv_header is not None and lv_header.effective_format != SaveFormat.RAW:
                raise UnsupportedError("a mapped-ram stream inside a compressed libvirt image")
            _pwrite_all(fd, first, base)
            size = _copy_sparse(_Input(stream.read, None), fd, base + len(first))
            if lv_header is not None:
                # A raw header over a mapped-ram stream: saying "sparse" makes it restorable.
                raw = os.pread(fd, LIBVIRT_HEADER_SIZE, 0)
                _pwrite_all(fd, encode.libvirt_header(lv_header, raw, format=SaveFormat.SPARSE,
                                                      complete=True), 0)
                os.fsync(fd)
            return ConvertResult(container, source_format, True, 0, 0, size, time.monotonic() - t0)
    # The writer is the parser's record sink: pages go straight from the stream to their slots.
    writer = MappedRamWriter(fd, functools.partial(_start_output, fd, base), jobs=jobs, direct_fd=direct_fd)
    tail: bytes | bytearray | None
    piece: Callable[[SectionPiece], Iterator[bytes | bytearray]]
    try:
        if seekable is not None:
            reporting = _Reporting(seekable, progress, drop_cache=direct_fd is not None)
            layout_src = parse_stream(reporting, base, seekable.size, sink=writer)
            tail = seekable.read_at(layout_src.device_offset, layout_src.end - layout_src.device_offset)
            reporting.finish()
            layout_src = _rebase(layout_src, base)
            piece = functools.partial(_read_piece, seekable, base)
        else:
            fwd = ForwardSource(_Prepend(first, stream.read).read, keep=8 << 20)
            kept = parse_stream_kept(fwd, 0, None, sink=writer)
            layout_src, tail = kept.layout, kept.tail
            piece = lambda p: iter((kept.piece(p),))  # noqa: E731
    except BaseException:
        writer.abort()
        raise
    writer.finish()
    size = _write_stream_tail(fd, base, writer.layout, layout_src, tail, piece)
    os.ftruncate(fd, size)
    os.fsync(fd)
    if direct_fd is not None:
        os.fsync(direct_fd)
    if lv_header is not None:
        raw = os.pread(fd, LIBVIRT_HEADER_SIZE, 0)
        _pwrite_all(fd, encode.libvirt_header(lv_header, raw, format=SaveFormat.SPARSE, complete=True), 0)
        os.fsync(fd)
    populated = tuple(int.from_bytes(bm, "little").bit_count() for bm in writer.bitmaps)
    return ConvertResult(container, source_format, False, writer.pages_written, writer.zero_pages, size,
                         time.monotonic() - t0, populated, layout_src.warnings)


def _start_output(fd: int, base: int, ram: RamSetup) -> list[BlockLayout]:
    """Once the source's block list is known: check that it can be converted, place every
    block as QEMU's ``ram_save_setup`` would, and write everything before the first page
    region (file header, configuration, RAM START, block records, mapped-ram headers)."""
    conf = ram.configuration
    if conf is None:
        raise UnsupportedError("the stream has no configuration section, so it cannot announce "
                               "mapped-ram (saved with send-configuration=off)")
    if CAP_MAPPED_RAM in ram.capabilities:
        raise FormatError("internal: a mapped-ram stream reached the sequential converter")
    if CAP_X_IGNORE_SHARED in ram.capabilities:
        raise UnsupportedError("x-ignore-shared streams cannot be converted: QEMU 10.0 cannot "
                               "restore mapped-ram with x-ignore-shared")
    caps = encode.with_capability(ram.capabilities, CAP_MAPPED_RAM)
    head = (encode.file_header() + encode.configuration(conf, caps)
            + encode.section_start(ram.ram_section_id)
            + encode.mem_size(sum(b.used_length for b in ram.blocks)))
    layout = plan_blocks(ram.blocks, base + len(head), ram.page_size)
    _pwrite_all(fd, head, base)
    for blk in layout:
        record = encode.block_record(blk.record.idstr, blk.record.used_length)
        _pwrite_all(fd, record + encode.mapped_ram_header(ram.page_size, blk.bitmap_offset, blk.pages_offset),
                    blk.header_offset - len(record))
    return layout


class _Reporting:
    """A ``read_at`` source that reports how far parsing has got and, with ``drop_cache``,
    tells the kernel to forget what was read (``--direct-io``: the input stays out of the
    page cache too, not only the output)."""

    DROP_EVERY = 32 << 20

    def __init__(self, source: SeekableInput, progress: Progress | None, drop_cache: bool = False):
        self.source = source
        self.size = source.size
        self.progress = progress
        self.drop_cache = drop_cache
        self._dropped = 0

    def read_at(self, offset: int, size: int) -> bytes:
        data = self.source.read_at(offset, size)
        if self.progress is not None:
            self.progress(offset + len(data))
        if self.drop_cache and offset - self._dropped >= self.DROP_EVERY:
            os.posix_fadvise(self.source.fd, self._dropped, offset - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = offset
        return data

    def finish(self) -> None:
        if self.drop_cache:
            os.posix_fadvise(self.source.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _rebase(layout: StreamLayout, base: int) -> StreamLayout:
    """Offsets relative to the stream start, as a stream parse reports them."""
    import dataclasses
    if base == 0:
        return layout
    return dataclasses.replace(
        layout, device_offset=layout.device_offset - base,
        vmdesc_offset=None if layout.vmdesc_offset is None else layout.vmdesc_offset - base,
        ram_end_offset=layout.ram_end_offset - base, end=layout.end - base,
        iterables=tuple(dataclasses.replace(it, pieces=tuple(dataclasses.replace(p, offset=p.offset - base)
                                                             for p in it.pieces))
                        for it in layout.iterables))


def _read_piece(source: SeekableInput, base: int, piece: SectionPiece) -> Iterator[bytes]:
    """The bytes of an iterable section's piece (offsets relative to the stream at ``base``),
    COPY_CHUNK at a time: an HPT can be large."""
    pos, end = base + piece.offset, base + piece.offset + piece.length
    while pos < end:
        data = source.read_at(pos, min(COPY_CHUNK, end - pos))
        if not data:
            raise FormatError(f"the input ends inside an iterable section at {pos:#x}", pos)
        yield data
        pos += len(data)


class _Prepend:
    """``read(n)`` that first returns ``head``, then the rest of ``read``."""

    def __init__(self, head: bytes, read: Callable[[int], bytes]):
        self.head = head
        self._read = read

    def read(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self._read(n)


def _peek_caps(first: bytes) -> tuple[str, ...] | None:
    """Capabilities from the configuration at the start of ``first`` (None if not there)."""
    from ramfs.format.qemu import parse_configuration
    from ramfs.format.source import BytesSource
    try:
        conf = parse_configuration(BytesSource(first), 0)
    except FormatError:
        return None
    return conf.capabilities if conf else ()


def _write_stream_tail(fd: int, base: int, layout: list[BlockLayout], src: StreamLayout,
                       tail: bytes | bytearray | None,
                       piece: Callable[[SectionPiece], Iterator[bytes | bytearray]]) -> int:
    """After the last region: close the RAM START, one PART and the END (each just EOS, as
    QEMU writes them under mapped-ram), SWITCHOVER_START if the source had it, then the
    device state verbatim with the VM description updated. Returns the file size.

    The other iterable sections' pieces (``spapr/htab``, ``s390-storage_attributes``) follow
    RAM's of the same kind, verbatim and in their order, as QEMU's setup, iterate and
    complete loops write them (``qemu_savevm_state_setup``, ``_iterate``,
    ``_complete_precopy_iterable``): a later piece of the hash table overrides an earlier one."""
    sid = src.ram_section_id
    foot = encode.footer(sid) if src.footers else b""
    pos = layout[-1].end

    def put(data: bytes | bytearray) -> None:
        nonlocal pos
        _pwrite_all(fd, memoryview(data), pos)
        pos += len(data)

    def pieces(kind: int) -> None:
        for p in src.pieces(kind):
            for data in piece(p):
                put(data)

    put(encode.eos() + foot)
    pieces(SectionType.SECTION_START)
    put(encode.section_part_end(SectionType.SECTION_PART, sid) + encode.eos() + foot)
    pieces(SectionType.SECTION_PART)
    out = bytearray()
    if src.switchover_start:
        out += encode.command(MigCmd.SWITCHOVER_START)
    out += encode.section_part_end(SectionType.SECTION_END, sid) + encode.eos() + foot
    put(out)
    pieces(SectionType.SECTION_END)
    out = bytearray()
    if tail is None:
        if src.device_offset == src.end:
            raise UnsupportedError("the stream ends right after RAM: it has no device state to carry over")
        raise UnsupportedError("the device state after RAM is too large to carry over (over 16 MiB)")
    if src.vmdesc_offset is not None and src.vmdesc is not None:
        cut = src.vmdesc_offset - src.device_offset
        out += tail[:cut]
        out += encode.vmdesc_section(encode.vmdesc_with_mapped_ram(src.vmdesc))
    else:
        out += tail
    put(out)
    return pos


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    try:
        while len(view):
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as e:
        raise ImageIOError(f"writing the converted image failed: {e.strerror}", e.errno) from None


def _copy_sparse(src: _Input, fd: int, offset: int) -> int:
    """Copy the rest of ``src`` to ``fd`` at ``offset``, leaving all-zero 4 KiB blocks as holes."""
    pos = offset
    while True:
        data = src.read(COPY_CHUNK)
        if not data:
            break
        view = memoryview(data)
        i = 0
        while i < len(view):
            # Align pieces to 4 KiB of the output so that holes are whole file-system blocks.
            n = min(len(view) - i, 4096 - (pos + i) % 4096)
            piece = view[i:i + n]
            if n != 4096 or piece.tobytes() != _ZERO_BLOCK:
                _pwrite_all(fd, piece, pos + i)
            i += n
        pos += len(view)
    try:
        os.ftruncate(fd, pos)
        os.fsync(fd)
    except OSError as e:
        raise ImageIOError(f"writing the converted image failed: {e.strerror}", e.errno) from None
    return pos


class _SourceReader:
    """``read(n)`` in order over a ``read_at`` source (a qcow2 snapshot's VM state)."""

    def __init__(self, source: VmstateSource):
        self._source = source
        self._pos = 0

    def read(self, n: int) -> bytes:
        data = self._source.read_at(self._pos, n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._source.close()


def convert_file(src: str, dst: str, *, jobs: int = 1, direct_io: bool = False,
                 progress: Progress | None = None, snapshot: str | None = None) -> ConvertResult:
    """Convert the image ``src`` into a new file ``dst`` (never overwritten).

    The output is written under a temporary name beside ``dst`` and appears under ``dst``
    only once complete and checked (:mod:`ramfs.publish`); on any failure nothing is left
    behind. ``snapshot``: ``src`` is a qcow2 disk, convert the VM state of that internal
    snapshot (QEMU restores the result only with the disk reverted to the snapshot).
    """
    from ramfs.convert.verify import verify_output

    dst = os.path.abspath(dst)
    if os.path.lexists(dst):  # before opening the source; NewFile checks again
        raise RamfsError(f"{dst} already exists")
    fin: _SourceReader | io.FileIO
    if snapshot is not None:
        from ramfs.image.qcow2 import VmstateSource
        vmstate = VmstateSource(FileSource(src), snapshot)
        fin = _SourceReader(vmstate)
    else:
        try:
            fin = open(src, "rb", buffering=0)
        except OSError as e:
            raise ImageIOError(f"cannot open {src}: {e.strerror}", e.errno) from None
        try:
            if stat.S_ISREG(os.fstat(fin.fileno()).st_mode) and is_qcow2(os.pread(fin.fileno(), 4, 0)):
                from ramfs.image.qcow2 import needs_snapshot_error
                raise needs_snapshot_error(src)
        except BaseException:
            fin.close()
            raise
    new = NewFile(dst, readable=True)
    direct_fd = -1
    try:
        try:
            new.create()
            if direct_io:
                # The same inode again, not the name (which could be swapped meanwhile).
                direct_fd = reopen_direct(new.fd)
        except FileExistsError:
            raise RamfsError(f"{dst} already exists") from None
        except OSError as e:
            if direct_io and e.errno == errno.EINVAL:
                raise ImageIOError(f"{os.path.dirname(dst)} does not support O_DIRECT", e.errno) from None
            raise ImageIOError(f"cannot create {new.tmp_path}: {e.strerror}", e.errno) from None
        if snapshot is not None:
            result = convert_stream(fin.read, new.fd, jobs=jobs, direct_fd=direct_fd if direct_io else None,
                                    progress=progress, seekable=vmstate)
        else:
            assert isinstance(fin, io.FileIO)  # opened above: there is no snapshot
            with FileSource(src, fd=os.dup(fin.fileno())) as seekable:
                result = convert_stream(fin.read, new.fd, jobs=jobs, direct_fd=direct_fd if direct_io else None,
                                        progress=progress,
                                        seekable=seekable if stat.S_ISREG(seekable.stat.st_mode) else None)
        verify_output(f"/proc/self/fd/{new.fd}", result)  # the inode written, not a name
        try:
            new.publish()
        except FileExistsError:
            raise RamfsError(f"{dst} already exists") from None
        except OSError as e:
            raise ImageIOError(f"cannot create {dst}: {e.strerror}", e.errno) from None
        return result
    finally:
        fin.close()
        if direct_fd >= 0:
            os.close(direct_fd)
        new.close()
