"""What a mount looks like, independent of FUSE: directories, files and their contents.

One image shows as::

    ram/<idstr>        one file per RAM block (reads resolve through bitmap or index)
    maps/<idstr>       "start end" lines: the populated byte ranges of that block
    image.json         the same facts as ``ramfs info --json``
    devices.json       the VM description QEMU wrote after the device state (when present)
    domain.xml         libvirt images: the domain XML as stored
    cookie.xml         libvirt images: the save cookie
    ERROR              instead of all of the above when the image cannot be opened

A directory of images shows each image as ``<filename>/`` with that layout; images are
recognised by their first bytes and opened on first use, and the directory is rescanned when
it changes. Nodes never change once built: a changed image gets new inode numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ramfs.errors import RamfsError
from ramfs.format.libvirt import QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL
from ramfs.format.qemu import QEMU_VM_FILE_MAGIC_BYTES
from ramfs.fs.convertdir import TMP_PREFIX
from ramfs.fs.names import COLLISION_MARK, escape
from ramfs.image import Image, open_image
from ramfs.image.describe import describe
from ramfs.image.elfcore import ElfCore, cpus_of
from ramfs.image.phys import PhysView, phys_map

log = logging.getLogger("ramfs.fs")

ROOT_INODE = 1
BLOCK_BLKSIZE = 1 << 20  # st_blksize of block files: tools then read in 1 MiB units
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
CONVERT_DIR = b"convert"
RESCAN_INTERVAL = 1.0  # seconds between directory-mode rescans of the backing directory


@dataclass(eq=False)
class Node:
    inode: int
    name: bytes
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return False


@dataclass(eq=False)
class DirNode(Node):
    children: dict[bytes, Node] = field(default_factory=dict)
    # Directory mode: called (off the event loop) before children are needed.
    populate: Callable[["DirNode"], None] | None = None
    dynamic: bool = False  # may change (directory mode): short kernel cache timeouts
    path: str | None = None  # directory mode: the image file behind this directory
    mode: int = DIR_MODE

    @property
    def is_dir(self) -> bool:
        return True


@dataclass(eq=False)
class FileNode(Node):
    size: int = 0
    blocks: int = 0  # st_blocks, in 512-byte units
    data: bytes | None = None  # small metadata files live in memory
    reader: Callable[[int, int], bytes] | None = None  # large files read through the image
    has_data: Callable[[int, int], bool] | None = None  # False: the range reads as zeros, no I/O
    # reader(offset, size, nowait=True) from the page cache only, or WouldBlock (on the loop)
    cached_reader: Callable[..., bytes] | None = None
    stream: bool = False  # content never changes and is costly: let the kernel cache it
    mode: int = FILE_MODE
    dynamic_data: Callable[[], bytes] | None = None  # generated at each open (STATUS)
    conversion: object | None = None  # convert/: the conversion this file is being written to


class Tree:
    """The inode table and the nodes of one mount."""

    def __init__(self, *, direct_io: bool = False, cache: str | None = None, below_4g: int | None = None):
        self.nodes: dict[int, Node] = {}
        self._next = ROOT_INODE
        self._lock = threading.Lock()
        self.direct_io = direct_io
        self.cache = cache
        self.preopened: dict[str, int] = {}  # realpath -> descriptor opened before --user
        self.progress = None  # progress(done, total) while an image is first opened
        self.below_4g = below_4g
        self.images: list[Image] = []
        self.root: DirNode | None = None
        self.convert_dir: DirNode | None = None  # directory mode only
        self.converter = None
        # Called with (parent inode, name) when directory mode drops or replaces an entry, so
        # the FUSE layer can make the kernel forget its cached dentry at once.
        self.on_entry_gone: Callable[[int, bytes], None] | None = None

    def new_inode(self) -> int:
        with self._lock:
            ino = self._next
            self._next += 1
            return ino

    def add(self, node: Node, parent: DirNode | None = None) -> Node:
        self.nodes[node.inode] = node
        if parent is not None:
            parent.children[node.name] = node
        return node

    def mkdir(self, parent: DirNode, name: bytes, mtime_ns: int) -> DirNode:
        existing = parent.children.get(name)
        if isinstance(existing, DirNode):
            return existing
        return self.add(DirNode(self.new_inode(), name, mtime_ns), parent)

    def file(self, parent: DirNode, name: bytes, mtime_ns: int, **kw) -> FileNode:
        if "data" in kw and kw["data"] is not None:
            kw.setdefault("size", len(kw["data"]))
            kw.setdefault("blocks", (len(kw["data"]) + 511) // 512)
        return self.add(FileNode(self.new_inode(), name, mtime_ns, **kw), parent)

    def close(self) -> None:
        for img in self.images:
            img.close()
        self.images.clear()

    # -- single image ------------------------------------------------------------------
    def _open(self, path: str) -> Image:
        # An image opened before privileges were dropped (--user) is used once; reopening it
        # later (it changed) happens as the unprivileged user.
        fd = self.preopened.pop(os.path.realpath(path), None)
        return open_image(path, cache=self.cache, direct_io=self.direct_io, fd=fd, progress=self.progress)

    def mount_image(self, path: str) -> None:
        img = self._open(path)
        self.images.append(img)
        mtime = img.source.stat.st_mtime_ns  # fstat: the path may not be ours to stat (--user)
        self.root = self.add(DirNode(self.new_inode(), b"", mtime))
        assert self.root.inode == ROOT_INODE
        self.fill_image_dir(self.root, img, mtime)

    def fill_image_dir(self, d: DirNode, img: Image, mtime: int) -> None:
        ram = self.mkdir(d, b"ram", mtime)
        maps = self.mkdir(d, b"maps", mtime)
        for blk in img.blocks:
            comps, _ = escape(blk.idstr)
            leaf_ram, leaf_maps = ram, maps
            for comp in comps[:-1]:
                leaf_ram = self._subdir(leaf_ram, comp, mtime)
                leaf_maps = self._subdir(leaf_maps, comp, mtime)
            name = comps[-1]
            if name in leaf_ram.children:
                # A block whose path is also another block's directory: mark it, reversibly.
                name += COLLISION_MARK
            self.file(leaf_ram, name, mtime, size=blk.used_length,
                      blocks=blk.populated_pages * blk.page_size // 512,
                      reader=functools.partial(img.read, blk), has_data=blk.has_data, stream=True,
                      cached_reader=self._nowait(functools.partial(img.read, blk)))
            text = "".join(f"{a} {b}\n" for a, b in blk.populated_ranges()).encode()
            self.file(leaf_maps, name, mtime, data=text)
        self._fill_cpus(d, img, mtime)
        self._fill_phys(d, img, maps, mtime)
        self._fill_export(d, img, mtime)
        facts = json.dumps(describe(img, below_4g=self.below_4g), indent=2).encode() + b"\n"
        self.file(d, b"image.json", mtime, data=facts)
        if img.layout.vmdesc is not None:
            self.file(d, b"devices.json", mtime, data=img.layout.vmdesc)
        if img.domain_xml is not None:
            self.file(d, b"domain.xml", mtime, data=img.domain_xml.encode())
        if img.cookie_xml is not None:
            self.file(d, b"cookie.xml", mtime, data=img.cookie_xml.encode())

    def _fill_phys(self, d: DirNode, img: Image, maps: DirNode, mtime: int) -> None:
        """phys/memory (guest-physical addresses) and phys/core.elf, when the machine is known."""
        try:
            pmap = phys_map(img, self.below_4g)
        except RamfsError as e:  # e.g. a --below-4g that makes ranges overlap: no phys/ only
            log.warning("%s: no phys/: %s", img.path, e)
            return
        if not pmap.ranges:
            return
        view = PhysView(img, pmap)
        phys = self.mkdir(d, b"phys", mtime)
        populated = list(view.populated_ranges())
        self.file(phys, b"memory", mtime, size=view.size,
                  blocks=sum(b - a for a, b in populated) // 512, reader=view.read,
                  has_data=view.has_data, stream=True, cached_reader=self._nowait(view.read))
        text = "".join(f"{a} {b}\n" for a, b in populated).encode()
        self.file(self.mkdir(maps, b"@phys", mtime), b"memory", mtime, data=text)
        try:
            core = ElfCore(view, cpus_of(img))
        except RamfsError as e:
            log.warning("%s: no core.elf: %s", img.path, e)
            return
        self.file(phys, b"core.elf", mtime, size=core.size, blocks=(core.size + 511) // 512,
                  reader=core.read, stream=True, cached_reader=self._nowait(core.read))

    def _nowait(self, read: Callable[..., bytes]) -> Callable[[int, int], bytes] | None:
        """The page-cache-only variant of a view's reader, tried on the event loop first;
        none with --direct-io (O_DIRECT never has the bytes in the page cache)."""
        return None if self.direct_io else functools.partial(read, nowait=True)

    def _fill_export(self, d: DirNode, img: Image, mtime: int) -> None:
        """export/sequential.img: the image as a classic sequential save image (for QEMU < 9.0
        and libvirt < 11.2), produced on read; its size is exact before the first read."""
        from ramfs.convert.export import SequentialExport
        if img.data is None:
            return
        try:
            export = SequentialExport(img)
        except RamfsError as e:
            log.warning("%s: no export/: %s", img.path, e)
            return
        self.file(self.mkdir(d, b"export", mtime), b"sequential.img", mtime, size=export.size,
                  blocks=(export.size + 511) // 512, reader=export.read, stream=True,
                  cached_reader=self._nowait(export.read))

    def _fill_cpus(self, d: DirNode, img: Image, mtime: int) -> None:
        """cpus.json: the vCPU registers, decoded from the device state through the vmdesc."""
        from ramfs.format.vmstate import cpu_states, parse_devices
        if img.data is None or img.layout.vmdesc is None:
            return
        try:
            cpus = cpu_states(parse_devices(img.data, img.layout))
        except RamfsError as e:
            log.warning("%s: no cpus.json: %s", img.path, e)
            self.file(d, b"cpus.json", mtime, data=json.dumps({"error": str(e)}).encode() + b"\n")
            return
        self.file(d, b"cpus.json", mtime,
                  data=json.dumps([c.to_dict() for c in cpus], indent=2).encode() + b"\n")

    def _subdir(self, parent: DirNode, name: bytes, mtime: int) -> DirNode:
        existing = parent.children.get(name)
        if existing is not None and not existing.is_dir:
            # A file took this name first; move it aside by the same marker rule.
            del parent.children[name]
            existing.name = name + COLLISION_MARK
            parent.children[existing.name] = existing
        return self.mkdir(parent, name, mtime)

    # -- directory mode ----------------------------------------------------------------
    def mount_directory(self, path: str, *, convert_jobs: int = 1) -> None:
        from ramfs.fs.convertdir import ConvertManager

        self.backing = os.path.realpath(path)
        st = os.stat(self.backing)
        self.root = self.add(DirNode(self.new_inode(), b"", st.st_mtime_ns, dynamic=True))
        self._entries: dict[bytes, tuple[tuple, DirNode]] = {}
        self._scanned_at = 0.0
        self.converter = ConvertManager(self.backing, jobs=convert_jobs, direct_io=self.direct_io)
        stale = self.converter.cleanup_stale()
        if stale:
            log.info("removed %d stale conversion temporaries from %s", stale, self.backing)
        self.convert_dir = self.add(DirNode(self.new_inode(), CONVERT_DIR, st.st_mtime_ns,
                                            mode=stat.S_IFDIR | 0o755, dynamic=True), self.root)
        self.file(self.convert_dir, b"STATUS", st.st_mtime_ns, size=0,
                  dynamic_data=self.converter.status_text)
        self.rescan(force=True)

    def rescan(self, force: bool = False) -> None:
        """Bring the root in line with the backing directory (blocking: call off the loop)."""
        if self.root is None or not hasattr(self, "backing"):
            return
        now = time.monotonic()
        if not force and now - self._scanned_at < RESCAN_INTERVAL:
            return
        self._scanned_at = now
        seen: dict[bytes, tuple] = {}
        try:
            it = os.scandir(self.backing)
        except OSError as e:
            log.error("cannot list %s: %s", self.backing, e.strerror)
            return
        with it:
            for entry in it:
                try:
                    # Symlinks are never followed: nothing outside the directory is shown.
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                name = os.fsencode(entry.name)
                if name.startswith(TMP_PREFIX.encode()) or name == CONVERT_DIR:
                    continue  # our own temporaries; the name of the convert directory
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                old = self._entries.get(name)
                if old is not None and old[0] == key:
                    seen[name] = key
                    continue
                if not _looks_like_image(entry.path):
                    continue
                seen[name] = key
                if old is not None:
                    self._drop(name)
                d = DirNode(self.new_inode(), name, st.st_mtime_ns, populate=self._populate_image,
                            dynamic=True, path=entry.path)
                self._entries[name] = (key, d)
                self.add(d, self.root)
        for name in list(self._entries):
            if name not in seen:
                self._drop(name)

    def _drop(self, name: bytes) -> None:
        _, d = self._entries.pop(name)
        if self.root.children.get(name) is d:
            del self.root.children[name]
        if self.on_entry_gone is not None:
            self.on_entry_gone(self.root.inode, name)

    def _populate_image(self, d: DirNode) -> None:
        path = d.path
        try:
            img = self._open(path)
        except RamfsError as e:
            log.warning("%s: %s", path, e)
            self.file(d, b"ERROR", d.mtime_ns, data=f"{e}\n".encode())
            return
        except OSError as e:
            log.warning("%s: %s", path, e.strerror)
            self.file(d, b"ERROR", d.mtime_ns, data=f"cannot read {path}: {e.strerror}\n".encode())
            return
        self.images.append(img)
        self.fill_image_dir(d, img, d.mtime_ns)


def _looks_like_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL) or head[:4] == QEMU_VM_FILE_MAGIC_BYTES
