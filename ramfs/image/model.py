"""The image model: open a save image, describe it, and read its RAM blocks.

``open_image`` recognises the container by content (libvirt header or bare ``QEVM``) and
the RAM encoding by the stream's capabilities, then gives each RAM block a run iterator:
``runs(offset, size)`` yields ``(file_offset or None, length)`` pieces, ``None`` meaning zeros.
``Image.read`` turns runs into bytes with as few ``pread`` calls as the layout allows.
"""

from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Self, cast

from ramfs import __version__
from ramfs.errors import (CacheError, FormatError, ImageIOError, NotAnImageError, RamfsError, TruncatedError,
                          UnsupportedError)
from ramfs.format.libvirt import LIBVIRT_HEADER_SIZE, LibvirtMetadata, SaveFormat, is_libvirt_magic, parse_metadata
from ramfs.format.qcow2 import is_qcow2
from ramfs.format.qemu import (CAP_MAPPED_RAM, MAPPED_RAM_FILE_OFFSET_ALIGNMENT, RamBlockRecord, StreamLayout,
                               count_bits, is_qemu_magic, parse_configuration, parse_stream, set_runs)
from ramfs.format.source import ForwardSource, Source
from ramfs.image.bitmap import Bitmap, load_bitmap
from ramfs.image import cache as _cache
from ramfs.image.cache import DECOMPRESSED, INDEX, CachePolicy, HeldStream, atomic_tmp, image_key
from ramfs.image.decompress import Decompressor, SparseSpool
from ramfs.image.files import FileSource
from ramfs.image.index import CHUNK_PAGES, CHUNK_SHIFT, PageIndex
from ramfs.ranges import merge_ranges

# Neighbouring payloads closer than this are fetched with one pread and sliced: in a
# sequential stream consecutive pages sit 8 bytes apart (the next record header).
GATHER_GAP = 64
_SKIP = memoryview(bytearray(GATHER_GAP))  # where record headers go in a scatter read
_IOV_PAGES = 500  # pages per preadv: two iovecs each, under Linux's IOV_MAX of 1024

# Pages per span of the populated-page lookup tables (RamBlock.populated_spans): one index
# chunk, 4 KiB of bitmap.
SPAN_PAGES = CHUNK_PAGES


class ImageFile(Protocol):
    """What an image is read through: a :class:`FileSource`, a ``DirectFileSource``
    (O_DIRECT), or a qcow2 snapshot's VM state (``ramfs.image.qcow2.VmstateSource``).
    ``readv_at`` is optional: :meth:`Image._gather` uses it where present."""

    path: str
    fd: int
    size: int
    stat: os.stat_result

    def read_at(self, offset: int, size: int) -> bytes: ...

    def readinto_at(self, buf: memoryview, offset: int, nowait: bool = False) -> None: ...

    def data_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]: ...

    def close(self) -> None: ...


class RamBlock:
    """One RAM block of an image. Subclasses know where its pages are."""

    def __init__(self, record: RamBlockRecord, page_size: int, populated_pages: int):
        self.record = record
        self.idstr = record.idstr
        self.index = record.index
        self.used_length = record.used_length
        self.page_size = page_size
        self.num_pages = record.used_length // page_size
        self.populated_pages = populated_pages

    def page_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int | None]]:
        """Yield ``(start_page, stop_page, file_offset or None)`` covering ``[first, last)``."""
        raise NotImplementedError

    def runs(self, offset: int, size: int) -> Iterator[tuple[int | None, int]]:
        """``(file_offset or None, length)`` pieces for bytes ``[offset, offset+size)``."""
        end = min(offset + size, self.used_length)
        if offset >= end:
            return
        ps = self.page_size
        for start, stop, foff in self.page_runs(offset // ps, (end + ps - 1) // ps):
            a = max(start * ps, offset)
            b = min(stop * ps, end)
            yield (None if foff is None else foff + (a - start * ps)), b - a

    def has_data(self, offset: int, size: int) -> bool:
        """Whether any populated page intersects ``[offset, offset+size)`` (no I/O)."""
        end = min(offset + size, self.used_length)
        if offset >= end:
            return False
        ps = self.page_size
        return any(foff is not None for _, _, foff in self.page_runs(offset // ps, (end + ps - 1) // ps))

    def populated_spans(self) -> Iterator[tuple[int, int, int]]:
        """``(first_page, last_page, populated)`` for the spans of at most :data:`SPAN_PAGES`
        pages that hold data, ascending. Subclasses count them from their bitmaps (popcount),
        so a lookup table over them costs per span, not per run: a guest using one page in
        two has a run per populated page."""
        n = self.num_pages
        for a in range(0, n, SPAN_PAGES):
            b = min(a + SPAN_PAGES, n)
            k = sum((z - y) // self.page_size for y, z in self.populated_ranges(a * self.page_size, b * self.page_size))
            if k:
                yield a, b, k

    def populated_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Byte ranges ``(start, end)`` of pages that hold data (coalesced), within the pages
        covering ``[start, end)`` (default: the whole block)."""
        ps = self.page_size
        last = self.num_pages if end is None else min(self.num_pages, (end + ps - 1) // ps)
        yield from merge_ranges((a * ps, b * ps) for a, b, foff in self.page_runs(min(start // ps, last), last)
                                if foff is not None)


class MappedRamBlock(RamBlock):
    """Bit set: the page is at ``pages_offset + i * page_size``; bit clear: zeros."""

    def __init__(self, record: RamBlockRecord, page_size: int, bitmap: Bitmap):
        super().__init__(record, page_size, bitmap.populated_count(record.used_length // page_size))
        self.bitmap = bitmap
        assert record.mapped is not None  # load_bitmap refused a block without its mapped-ram header
        self.pages_offset = record.mapped.pages_offset

    def populated_spans(self) -> Iterator[tuple[int, int, int]]:
        n = self.num_pages
        for base, bits in self.bitmap.pieces():
            for a in range(base, min(base + len(bits) * 8, n), SPAN_PAGES):
                b = min(a + SPAN_PAGES, base + len(bits) * 8, n)
                k = count_bits(bits, a - base, b - base)
                if k:
                    yield a, b, k

    def page_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int | None]]:
        pos = first
        ps = self.page_size
        if self.bitmap:
            for a, b in self.bitmap.set_runs(first, last):
                if a > pos:
                    yield pos, a, None
                yield a, b, self.pages_offset + a * ps
                pos = b
        if pos < last:
            yield pos, last, None


class IndexedBlock(RamBlock):
    """A sequential image's block: page offsets come from the index."""

    def __init__(self, record: RamBlockRecord, page_size: int, index: PageIndex):
        super().__init__(record, page_size, index.populated(record.index))
        self._index = index

    def _data_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int, array[int]]]:
        """``(start, stop, base, offsets)`` for the runs of populated pages in ``[first,
        last)``, chunk by chunk: ``offsets[page - base]`` is a page's payload offset."""
        b = self.index
        idx = self._index
        p = first
        while p < last:
            no = p >> CHUNK_SHIFT
            base = no << CHUNK_SHIFT
            chunk_end = min(last, base + (1 << CHUNK_SHIFT))
            bits = idx.chunk_bits(b, no)
            if bits is not None:
                offs = idx.chunk(b, no)
                assert offs is not None  # a chunk and its bitmap are made and loaded together (PageIndex)
                for a, z in set_runs(bits, p - base, chunk_end - base):
                    yield base + a, base + z, base, offs
            p = chunk_end

    def page_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int | None]]:
        pos = first
        for a, z, base, offs in self._data_runs(first, last):
            if a > pos:
                yield pos, a, None
            for q in range(a, z):
                yield q, q + 1, offs[q - base]
            pos = z
        if pos < last:
            yield pos, last, None

    def plan(self, offset: int, end: int) -> list[tuple[int, int, int, int]]:
        """The populated pieces of bytes ``[offset, end)`` as ``(dst, file_offset, length,
        stride)``: ``stride`` 0 is one contiguous piece; otherwise ``length // page_size``
        whole pages at ``file_offset + k * stride``. Consecutive records of a sequential
        stream are such a progression, so a 1 MiB read is a few pieces, not 256."""
        ps = self.page_size
        out: list[tuple[int, int, int, int]] = []
        full_end = end // ps  # pages below this end inside the read
        for pg, z, base, offs in self._data_runs(offset // ps, (end + ps - 1) // ps):
            while pg < z:
                start = pg * ps
                k = pg - base
                m = min(z, full_end, pg + _IOV_PAGES) - pg
                if start < offset or m < 2:
                    lo = max(offset, start)
                    hi = min(end, start + ps)
                    out.append((lo - offset, offs[k] + lo - start, hi - lo, 0))
                    pg += 1
                    continue
                o0 = offs[k]
                stride = offs[k + 1] - o0
                if not ps <= stride <= ps + GATHER_GAP:  # not one record after another
                    m = 1
                else:
                    while m > 1 and offs[k:k + m] != array("q", range(o0, o0 + m * stride, stride)):
                        m //= 2
                out.append((start - offset, o0, m * ps, stride if m > 1 else 0))
                pg += m
        return out

    def populated_spans(self) -> Iterator[tuple[int, int, int]]:
        for no in sorted(self._index.chunks[self.index]):
            base = no << CHUNK_SHIFT  # an index chunk is one span
            b = min(base + SPAN_PAGES, self.num_pages)
            bits = self._index.chunk_bits(self.index, no)
            k = count_bits(bits, 0, b - base) if bits is not None and b > base else 0
            if k:
                yield base, b, k

    def populated_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Straight from the chunk bitmaps: no per-page work in zero runs."""
        ps = self.page_size
        yield from merge_ranges((a * ps, z * ps) for a, z in self._populated_runs(start // ps, end))

    def _populated_runs(self, first: int, end: int | None) -> Iterator[tuple[int, int]]:
        """Runs of populated pages from ``first`` to the page holding byte ``end`` (or the
        end of the block), chunk by chunk (a run may continue in the next chunk)."""
        ps = self.page_size
        last = self.num_pages if end is None else min(self.num_pages, (end + ps - 1) // ps)
        for no in sorted(self._index.chunks[self.index]):
            base = no << CHUNK_SHIFT
            lo, hi = max(first - base, 0), min(1 << CHUNK_SHIFT, last - base)
            if lo < hi:
                bits = self._index.chunk_bits(self.index, no)
                assert bits is not None  # a chunk and its bitmap are made and loaded together (PageIndex)
                for a, z in set_runs(bits, lo, hi):
                    yield base + a, base + z


@dataclass(frozen=True)
class Device:
    name: str
    instance_id: int
    version: int
    vmsd_name: str | None


class Image:
    """An open save image. Thread-safe for reads (``pread`` only)."""

    def __init__(self, path: str, source: ImageFile, libvirt: LibvirtMetadata | None,
                 layout: StreamLayout, blocks: list[RamBlock], data: ImageFile | None,
                 warnings: list[str], cached: bool):
        self.path = path
        self.source = source
        self.libvirt = libvirt
        self.layout = layout
        self.blocks = blocks
        self.data = data  # where page payloads are read from (the image, or a decompression cache)
        self.warnings = warnings
        self.index_from_cache = cached
        self.held: HeldStream | None = None  # the decompressed stream in the cache this image reads
        self._by_name = {b.idstr: b for b in blocks}

    # -- description -----------------------------------------------------------------
    @property
    def container(self) -> str:
        return "libvirt" if self.libvirt else "bare"

    @property
    def format(self) -> SaveFormat | None:
        return self.libvirt.header.effective_format if self.libvirt else None

    @property
    def encoding(self) -> str:
        return "mapped-ram" if self.layout.mapped_ram else "sequential"

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    @property
    def was_running(self) -> bool | None:
        return self.libvirt.header.was_running if self.libvirt else None

    @property
    def domain_xml(self) -> str | None:
        return self.libvirt.domain_xml if self.libvirt else None

    @property
    def cookie_xml(self) -> str | None:
        return self.libvirt.cookie_xml if self.libvirt else None

    def block(self, idstr: str) -> RamBlock:
        try:
            return self._by_name[idstr]
        except KeyError:
            raise RamfsError(f"no RAM block {idstr!r} in {self.path}") from None

    def devices(self) -> list[Device] | None:
        desc = self.layout.vmdesc_json()
        if desc is None:
            return None
        out = []
        listed = desc.get("devices")
        # A description whose "devices" is not a list lists nothing (vmstate.parse_devices
        # reports it); a hostile one must not turn describe() into a TypeError.
        for d in listed if isinstance(listed, list) else []:
            if isinstance(d, dict):
                out.append(Device(name=str(d.get("name", "")), instance_id=_int(d.get("instance_id")),
                                  version=_int(d.get("version")), vmsd_name=d.get("vmsd_name")))
        return out

    # -- reads -----------------------------------------------------------------------
    def read(self, block: RamBlock | str, offset: int, size: int, nowait: bool = False) -> bytearray:
        """Bytes ``[offset, offset+size)`` of a block, short only at its end.

        ``nowait``: only if the bytes are in the page cache, else :class:`WouldBlock`.
        """
        if isinstance(block, str):
            block = self.block(block)
        if self.data is None:
            raise RamfsError(f"{self.path} was opened for its description only")
        if offset < 0 or size < 0:
            raise RamfsError("negative offset or size")
        end = min(offset + size, block.used_length)
        if offset >= end:
            return bytearray()
        out = bytearray(end - offset)
        view = memoryview(out)
        if isinstance(block, IndexedBlock):
            pending = block.plan(offset, end)
        else:
            pending = []  # (dst, file_offset, length, 0), file-ascending
            pos = 0
            for foff, length in block.runs(offset, end - offset):
                if foff is not None:
                    pending.append((pos, foff, length, 0))
                pos += length
        self._gather(view, pending, nowait, block.page_size)
        return out

    def _gather(self, view: memoryview, pieces: list[tuple[int, int, int, int]], nowait: bool = False,
                ps: int = 4096) -> None:
        data = self.data
        assert data is not None  # read() refuses an image opened for its description only
        i = 0
        n = len(pieces)
        while i < n:
            dst, foff, length, stride = pieces[i]
            if stride:
                # Whole pages every ``stride`` bytes (a sequential image's records): one read
                # of the span, then the pages are copied out of it.
                count = length // ps
                i += 1
                if stride - ps <= len(_SKIP) and count <= _IOV_PAGES and hasattr(data, "readv_at"):
                    # Straight into place: the record headers between pages go to a scratch
                    # buffer, all in one preadv (no span buffer, no copy per page).
                    skip = _SKIP[: stride - ps]
                    iov = []
                    for k in range(count):
                        iov.append(view[dst + k * ps : dst + (k + 1) * ps])
                        iov.append(skip)
                    iov.pop()
                    if data.readv_at(iov, foff, nowait):
                        continue
                span = memoryview(bytearray((count - 1) * stride + ps))
                data.readinto_at(span, foff, nowait)
                for k in range(count):
                    view[dst + k * ps : dst + (k + 1) * ps] = span[k * stride : k * stride + ps]
                continue
            j = i + 1
            span_end = foff + length
            while (j < n and not pieces[j][3] and 0 <= pieces[j][1] - span_end <= GATHER_GAP
                   and pieces[j][0] == pieces[j - 1][0] + pieces[j - 1][2]):
                span_end = pieces[j][1] + pieces[j][2]
                j += 1
            if j == i + 1:
                data.readinto_at(view[dst : dst + length], foff, nowait)
            else:
                joined = bytearray(span_end - foff)
                data.readinto_at(memoryview(joined), foff, nowait)
                for d, f, ln, _ in pieces[i:j]:
                    view[d : d + ln] = joined[f - foff : f - foff + ln]
            i = j

    def close(self) -> None:
        if self.held is not None:
            self.held.release()  # before the close drops its lock
            self.held = None
        if self.data is not None and self.data is not self.source:
            self.data.close()
        self.source.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int(v: object) -> int:
    return v if isinstance(v, int) else -1


def open_image(path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | CachePolicy | None = None,
               use_cache: bool = True,
               reads: bool = True, allow_partial: bool = False, direct_io: bool = False,
               fd: int | None = None, progress: Callable[[int, int], None] | None = None,
               snapshot: str | int | None = None) -> Image:
    """Open a save image (libvirt-wrapped or bare QEMU stream, any RAM encoding).

    ``cache``: the cache directory, or a :class:`CachePolicy` (directory, --no-cache,
    --rebuild-cache, --keep-cache, --cache-max). A compressed image's decompressed stream is
    removed from the cache when the image is closed unless the policy keeps it.
    ``reads=False`` describes a compressed image by streaming it, without spooling a
    decompressed copy. ``use_cache=False`` never reads or writes the cache. ``direct_io``
    reads the image with O_DIRECT (the decompression cache of formats 1-5 is still buffered).
    ``fd``: the image already opened (by a more privileged process), taken over and closed.
    ``progress(done, total)``: bytes of the file scanned so far, while an index is built or a
    compressed image is decompressed into the cache (for a progress bar).
    ``snapshot``: ``path`` is a qcow2 disk; open the VM state of its internal snapshot of that
    name (or id), a sequential stream inside the qcow2 file (ramfs.image.qcow2).
    """
    path = os.fspath(path)
    policy = cache if isinstance(cache, CachePolicy) else CachePolicy(directory=cache)
    if not use_cache:
        policy = replace(policy, enabled=False)
    if snapshot is not None:
        from ramfs.image.qcow2 import VmstateSource
        qsrc = VmstateSource(FileSource(path, fd), snapshot)
        try:
            return _open(qsrc.path, qsrc, policy, reads, allow_partial, progress, _Origin(path, qsrc.snapshot.name))
        except BaseException:
            qsrc.close()
            raise
    if direct_io:
        # O_DIRECT: the scan and every read bypass the host page cache (for hosts running VMs).
        from ramfs.image.files import DirectFileSource
        src: ImageFile = DirectFileSource(path, fd)
    else:
        src = FileSource(path, fd)
    try:
        return _open(path, src, policy, reads, allow_partial, progress, _Origin(path, None))
    except BaseException:
        src.close()
        raise


@dataclass(frozen=True)
class _Origin:
    """What a cache entry says it was made from (a qcow2 snapshot's key is made from
    ``disk@snapshot``, which is no file to look at)."""

    file: str
    snapshot: str | None


def _open(path: str, src: ImageFile, policy: CachePolicy, reads: bool, allow_partial: bool,
          progress: Callable[[int, int], None] | None, origin: _Origin) -> Image:
    head = src.read_at(0, max(LIBVIRT_HEADER_SIZE, 16))
    warnings: list[str] = []
    meta: LibvirtMetadata | None = None
    base = 0
    if is_libvirt_magic(head):
        meta = parse_metadata(src, allow_partial=allow_partial)
        if not meta.header.complete:
            warnings.append("incomplete save image: magic LibvirtQemudPart (libvirt did not finish it)")
        base = meta.header.stream_offset
        fmt = meta.header.effective_format
        if fmt.compressed:
            return _open_compressed(path, src, meta, policy, reads, warnings, progress, origin)
    elif not is_qemu_magic(head):
        if is_qcow2(head):
            from ramfs.image.qcow2 import needs_snapshot_error
            raise needs_snapshot_error(path)
        if len(head) < 4:
            raise NotAnImageError(f"{path}: not a save image (file is {len(head)} bytes long)")
        raise NotAnImageError(f"{path}: not a save image (neither a libvirt header nor a QEMU stream)")
    if src.size <= base:
        raise TruncatedError(f"{path}: the file ends where the QEMU stream should start ({base:#x})", base)
    probe = src.read_at(base, 4)
    if not is_qemu_magic(probe):
        raise FormatError("no QEMU stream (QEVM) where the libvirt header says it starts", base)
    key = image_key(path, src.stat)
    root = policy.root
    idx_path = _cache.main_file(root, INDEX, key)
    layout: StreamLayout | None = None
    index: PageIndex | None = None
    cached = False
    if policy.enabled and not policy.rebuild and _exists(idx_path):
        try:
            index, layout, _ = PageIndex.load(idx_path)
            index.validate(layout, src.size)
            cached = True
            _cache.touch(root, INDEX, key)
        except CacheError as e:
            warnings.append(f"ignored cached index: {e}")
            index = layout = None
    if layout is None:
        holder: list[PageIndex] = []
        scan: Source = _Counting(src, lambda pos: progress(pos, src.size)) if progress else src
        layout = _parse_with_index(scan, base, holder)
        index = None if layout.mapped_ram else holder[0]
        if index is not None and policy.enabled:
            _save_index(index, root, INDEX, key, layout, warnings, origin, src.stat, keep=True)
    if meta is not None:
        _check_format_matches(meta, layout, warnings)
    blocks = _make_blocks(src, layout, index, warnings)
    return Image(path, src, meta, layout, blocks, src, warnings + list(layout.warnings), cached)


def _check_format_matches(meta: LibvirtMetadata, layout: StreamLayout, warnings: list[str]) -> None:
    """libvirt restores format 6 with mapped-ram on and every other format with it off."""
    sparse = meta.header.effective_format == SaveFormat.SPARSE
    if sparse and not layout.mapped_ram:
        warnings.append("libvirt header says sparse (format 6) but the stream is sequential: "
                        "libvirt could not restore it")
    elif layout.mapped_ram and not sparse:
        warnings.append(f"libvirt header says {meta.header.effective_format.label} but the stream is "
                        f"mapped-ram: libvirt could not restore it")


def _raw_reader(path: str, src: ImageFile) -> io.BufferedReader:
    """A buffered file object on the image for a decompressor, through our descriptor (the
    path is never looked up again: it may have been swapped, or not be ours to open under
    --user). Reopened through /proc when possible, since an O_DIRECT descriptor shares its
    flags with every dup; else a dup with O_DIRECT cleared."""
    try:
        return open(f"/proc/self/fd/{src.fd}", "rb")
    except OSError:
        fd = os.dup(src.fd)
        if hasattr(os, "O_DIRECT"):
            import fcntl
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        return os.fdopen(fd, "rb")


class _Counting:
    """A source that reports how far a forward scan has read."""

    def __init__(self, src: Source, report: Callable[[int], None]):
        self._src = src
        self._report = report
        self.size = src.size

    def read_at(self, offset: int, size: int) -> bytes:
        data = self._src.read_at(offset, size)
        self._report(offset + len(data))
        return data

    def data_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        # The scan skips holes through this (a stream followed by a long hole): without it the
        # progress bar's wrapper made ramfs read a 1 TiB hole that a plain open jumps.
        ranges = getattr(self._src, "data_ranges", None)
        if ranges is None:
            yield start, end
        else:
            yield from ranges(start, end)


def _exists(p: Path) -> bool:
    """A cache entry we can use: an unreadable cache directory is no cache, not an error."""
    try:
        return p.exists()
    except OSError:
        return False


def _parse_with_index(src: Source, base: int, holder: list[PageIndex]) -> StreamLayout:
    """Parse once, filling a page index sized when the block list is known."""
    idx = PageIndex(0)
    holder.append(idx)
    layout = parse_stream(src, base, src.size, sink=idx)
    idx.add_blocks(len(layout.blocks))
    return layout


def _save_index(index: PageIndex, root: Path, kind: str, key: str, layout: StreamLayout, warnings: list[str],
                origin: _Origin, st: os.stat_result, keep: bool, extra: dict[str, object] | None = None) -> bool:
    """The index (and, for an index entry, its metadata); a warning instead of an error."""
    idx_path = _cache.entry_file(root, kind, key, ".idx")
    try:
        _cache.ensure_dir(root, idx_path.parent.name)
        index.save(idx_path, layout, {"ramfs": __version__, **(extra or {})})
        if kind == INDEX:
            _cache.write_meta(root, kind, key, origin.file, st, keep, origin.snapshot)
    except OSError as e:
        warnings.append(f"could not write the index cache {idx_path}: {e.strerror}")
        return False
    return True


def _make_blocks(src: ImageFile, layout: StreamLayout, index: PageIndex | None, warnings: list[str]) -> list[RamBlock]:
    blocks: list[RamBlock] = []
    for rec in layout.blocks:
        if layout.mapped_ram:
            # load_bitmap is annotated for FileSource; it uses only size, read_at and data_ranges.
            bitmap = load_bitmap(cast(FileSource, src), rec)
            extra = bitmap.bits_beyond(rec.used_length // layout.page_size)
            if extra:
                warnings.append(f"bitmap of {rec.idstr!r} has {extra} bits set past its "
                                f"{rec.used_length // layout.page_size} pages (ignored)")
            blocks.append(MappedRamBlock(rec, layout.page_size, bitmap))
        else:
            assert index is not None  # a sequential stream is always opened with its page index
            blocks.append(IndexedBlock(rec, layout.page_size, index))
    return blocks


def _open_compressed(path: str, src: ImageFile, meta: LibvirtMetadata, policy: CachePolicy, reads: bool,
                     warnings: list[str], progress: Callable[[int, int], None] | None, origin: _Origin) -> Image:
    fmt = meta.header.effective_format
    key = image_key(path, src.stat)
    root = policy.root
    if policy.enabled and not policy.rebuild:
        hit = _cached_decompression(path, src, meta, policy, key, warnings)
        if hit is not None:
            return hit
    spool: SparseSpool | None = None
    fd = -1
    tmp: Path | None = None
    data_path = _cache.main_file(root, DECOMPRESSED, key)
    if reads and policy.enabled:
        tmp = atomic_tmp(data_path)
        try:
            _cache.ensure_dir(root, data_path.parent.name)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            # Held from the start: once renamed into place it is an entry that eviction (which
            # needs the exclusive lock) must leave alone while we read it.
            _cache.lock_shared(fd)
        except OSError as e:
            raise CacheError(f"cannot create the decompression cache {tmp}: {e.strerror}") from None
        spool = SparseSpool(fd)
    elif reads:
        # --no-cache: reads need random access, so the stream goes to a file with no name
        # (O_TMPFILE in $TMPDIR) that the kernel frees when it is closed, even after a crash.
        import tempfile
        try:
            with tempfile.TemporaryFile(prefix=".ramfs-nocache-") as t:
                fd = os.dup(t.fileno())
        except OSError as e:
            raise CacheError(f"cannot create a temporary file for the decompressed stream of {path} "
                             f"in {tempfile.gettempdir()}: {e.strerror}") from None
        spool = SparseSpool(fd)
    try:
        raw = _raw_reader(path, src)
        raw.seek(meta.header.stream_offset)
        with Decompressor(path, meta.header.stream_offset, fmt, fileobj=raw) as dec:
            read: Callable[[int], bytes] = dec.read
            if progress:
                def counted(n: int, _read: Callable[[int], bytes] = dec.read, _raw: io.BufferedReader = raw,
                            _total: int = src.size) -> bytes:
                    data = _read(n)
                    progress(_raw.tell(), _total)
                    return data
                read = counted
            stream = ForwardSource(read, tee=spool.write_at if spool else None)
            conf = parse_configuration(stream, 0)
            if conf is not None and CAP_MAPPED_RAM in conf.capabilities:
                # Its offsets are absolute file offsets; QEMU needs a seekable file to write it.
                raise UnsupportedError(f"a mapped-ram stream inside a {fmt.label}-compressed image: "
                                       f"QEMU cannot write or restore such an image")
            holder: list[PageIndex] = []
            layout = _parse_with_index(stream, 0, holder)
            if spool is not None:
                stream.drain()
        if spool is None:
            # Description only: page offsets point into a stream we did not keep.
            described: list[RamBlock] = [IndexedBlock(rec, layout.page_size, holder[0]) for rec in layout.blocks]
            return Image(path, src, meta, layout, described, None, warnings + list(layout.warnings), False)
        try:
            spool.finish()
        except OSError as e:
            raise CacheError(f"cannot write the decompression cache {tmp}: {e.strerror}") from None
        if tmp is None:
            data = FileSource(f"{path} (decompressed into an unnamed temporary file)", fd)
            fd = -1
            blocks = _make_blocks(data, layout, holder[0], warnings)
            return Image(path, src, meta, layout, blocks, data, warnings + list(layout.warnings), False)
        st = os.fstat(fd)
        # The stream's identity goes into the index, so an index is never paired with another
        # stream (a rebuild replaces both, one rename at a time).
        if not _save_index(holder[0], root, DECOMPRESSED, key, layout, warnings, origin, src.stat, policy.keep,
                           {"stream_ino": st.st_ino, "stream_size": spool.size}):
            raise CacheError(f"cannot write the index of the decompression cache {data_path}")
        try:
            _cache.write_meta(root, DECOMPRESSED, key, origin.file, src.stat, policy.keep, origin.snapshot)
            os.replace(tmp, data_path)  # the stream last: its name makes the entry
        except OSError as e:
            raise CacheError(f"cannot write the decompression cache {tmp}: {e.strerror}") from None
        tmp = None
        data = FileSource(data_path, fd)
        held = HeldStream(root, key, fd, policy.keep)
        fd = -1
        try:
            blocks = _make_blocks(data, layout, holder[0], warnings)
        except BaseException:
            held.release()
            data.close()
            raise
        img = Image(path, src, meta, layout, blocks, data, warnings + list(layout.warnings), False)
        img.held = held
        _evict(root, policy, key, warnings)
        return img
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _cached_decompression(path: str, src: ImageFile, meta: LibvirtMetadata, policy: CachePolicy, key: str,
                          warnings: list[str]) -> Image | None:
    """The image read from its decompressed stream in the cache, or None (no usable entry)."""
    root = policy.root
    data_path = _cache.main_file(root, DECOMPRESSED, key)
    if not _exists(data_path):
        return None
    try:
        data = FileSource(data_path)
    except ImageIOError:
        return None  # evicted since
    try:
        # The stream first, then its index: an evictor unlinks the stream first, under the
        # exclusive lock, so a stream we hold is one whose index is still there.
        if not _cache.lock_shared(data.fd):
            data.close()
            return None
        index, layout, extra = PageIndex.load(_cache.entry_file(root, DECOMPRESSED, key, ".idx"))
        st = os.fstat(data.fd)
        if (extra.get("stream_ino"), extra.get("stream_size")) != (st.st_ino, st.st_size):
            raise CacheError("the index belongs to another decompressed stream")
        index.validate(layout, data.size)
        blocks = _make_blocks(data, layout, index, warnings)
    except (CacheError, ImageIOError, OSError) as e:
        data.close()
        warnings.append(f"ignored cached decompression: {e}")
        return None
    if policy.keep:
        _cache.set_keep(root, DECOMPRESSED, key)
    _cache.touch(root, DECOMPRESSED, key)
    img = Image(path, src, meta, layout, blocks, data, warnings + list(layout.warnings), True)
    img.held = HeldStream(root, key, data.fd, policy.keep)
    return img


def _evict(root: Path, policy: CachePolicy, keep_key: str, warnings: list[str]) -> None:
    """Keep decompressed data within the limit, now that an entry was added."""
    try:
        _cache.enforce_limit(root, policy.limit_spec(), protect=keep_key)
    except (OSError, RamfsError) as e:
        warnings.append(f"could not keep the cache {root} within its limit: {e}")


def domain_identity(xml: str | None) -> dict[str, str | None] | None:
    """Name and UUID from the domain XML, for descriptions; None when absent or unreadable."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return {"name": root.findtext("name"), "uuid": root.findtext("uuid"),
            "type": root.get("type")}


__all__ = ["Image", "RamBlock", "open_image", "domain_identity", "MAPPED_RAM_FILE_OFFSET_ALIGNMENT"]
