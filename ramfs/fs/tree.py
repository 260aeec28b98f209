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

Nobody sees more through a mount than the source files allow (docs/security.md): every node
of an image's subtree shares one :class:`Owner`, the image file's uid, gid and read bits,
updated in place when the file's owner or mode changes; the root of a directory mount and
``convert/`` mirror the backing directory. The kernel enforces them (``default_permissions``).
Images in a directory are opened by name relative to the directory's descriptor, with
``O_NOFOLLOW``, and must be the inode the listing showed; they are read through that
descriptor from then on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from ramfs.errors import ImageIOError, RamfsError
from ramfs.format.libvirt import QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL
from ramfs.format.qcow2 import is_qcow2
from ramfs.format.qemu import QEMU_VM_FILE_MAGIC_BYTES
from ramfs.fs.convertdir import TMP_PREFIX, Conversion, ConvertManager
from ramfs.fs.names import COLLISION_MARK, escape
from ramfs.image import Image, open_image
from ramfs.image.cache import CachePolicy
from ramfs.image.describe import describe
from ramfs.views.elfcore import ElfCore, cpus_of
from ramfs.image.files import open_regular
from ramfs.image.phys import Placement
from ramfs.views import BlockView, View
from ramfs.views.phys import PhysView

log = logging.getLogger("ramfs.fs")

ROOT_INODE = 1
BLOCK_BLKSIZE = 1 << 20  # st_blksize of block files: tools then read in 1 MiB units
CONVERT_DIR = b"convert"
RESCAN_INTERVAL = 1.0  # seconds between directory-mode rescans of the backing directory
# Directory mode: what a listed file was when last looked at, (dev, ino, size, mtime_ns) or
# ("unreadable",); () for the name convert/ takes.
EntryKey: TypeAlias = tuple[int | str, ...]


class Owner:
    """The owner, group and mode a subtree mirrors (of an image file, or of the backing
    directory). Shared by every node of the subtree; :meth:`update` replaces all three at
    once, so a reader never sees half of a change."""

    __slots__ = ("ids",)

    def __init__(self, uid: int, gid: int, mode: int):
        self.ids = (uid, gid, stat.S_IMODE(mode))

    @classmethod
    def of(cls, st: os.stat_result) -> Owner:
        return cls(st.st_uid, st.st_gid, st.st_mode)

    def update(self, st: os.stat_result) -> bool:
        ids = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        changed = ids != self.ids
        self.ids = ids
        return changed

    @property
    def file_mode(self) -> int:
        """What a read-only view of the source may show: its read bits, nothing more."""
        return self.ids[2] & 0o444

    @property
    def dir_mode(self) -> int:
        """A directory of a read-only view: the source's read bits, and search where it
        may be read (r--r----- gives r-xr-x---)."""
        r = self.ids[2] & 0o444
        return r | (r >> 2)


@dataclass(eq=False)
class Node:
    inode: int
    name: bytes
    mtime_ns: int
    owner: Owner

    @property
    def is_dir(self) -> bool:
        return False

    @property
    def st_mode(self) -> int:
        raise NotImplementedError


@dataclass(eq=False)
class DirNode(Node):
    children: dict[bytes, Node] = field(default_factory=dict)
    # Directory mode: the image behind it is opened (off the event loop) when first looked in.
    pending: bool = False
    dynamic: bool = False  # may change (directory mode): short kernel cache timeouts
    path: str | None = None  # directory mode: the image file behind this directory
    fd: int | None = None  # directory mode: that file, opened at listing, until populated
    writable: bool = False  # convert/: the backing directory's mode as it is, write bits too
    # A qcow2 disk's internal snapshot (its index in the snapshot table: names and ids may
    # collide, a name with another's id): the image is its VM state.
    snapshot: int | None = None

    @property
    def is_dir(self) -> bool:
        return True

    @property
    def st_mode(self) -> int:
        mode = self.owner.ids[2] & 0o7777 if self.writable else self.owner.dir_mode
        return stat.S_IFDIR | mode


@dataclass(eq=False)
class FileNode(Node):
    """A regular file; its kind (the subclass) says where its bytes come from."""

    size: int = 0
    blocks: int = 0  # st_blocks, in 512-byte units

    @property
    def st_mode(self) -> int:
        return stat.S_IFREG | self.owner.file_mode


@dataclass(eq=False)
class StaticFile(FileNode):
    """Small metadata (JSON, XML, maps, ERROR), held in memory."""

    data: bytes = b""


@dataclass(eq=False)
class ViewFile(FileNode):
    """A large file produced on read by a view (ramfs.views): block files, phys/memory,
    core.elf, the export, a published conversion. Never changes: the kernel may cache it."""

    view: View | None = None


@dataclass(eq=False)
class StatusFile(FileNode):
    """Text made anew at each open (convert/STATUS)."""

    render: Callable[[], bytes] | None = None


@dataclass(eq=False)
class ConversionFile(FileNode):
    """convert/NAME while it is being written: the caller's, with the mode it asked for."""

    conversion: Conversion | None = None

    @property
    def st_mode(self) -> int:
        return stat.S_IFREG | (self.owner.ids[2] & 0o777)


_N = TypeVar("_N", bound=Node)


@dataclass
class ScanPlan:
    """What a scan of the backing directory found, for :meth:`Tree.apply` to make so."""

    dir_stat: os.stat_result | None
    added: list[tuple[bytes, EntryKey, DirNode]] = field(default_factory=list)  # new or changed
    dropped: list[bytes] = field(default_factory=list)
    owners: list[tuple[Owner, os.stat_result]] = field(default_factory=list)


class Tree:
    """The inode table and the nodes of one mount.

    The threading rule. Worker threads only compute: list the backing directory and open
    what changed (:meth:`scan`), open an image and build its subtree detached from the tree
    (:meth:`build_image`). They hand the result back, and the thread that owns the tree (the
    event loop's; the one that created it) alone changes it (:meth:`apply`,
    :meth:`attach_image`, :meth:`add_conversion`, :meth:`replace`), so that a request served
    on the loop (``statfs`` walks ``nodes``) never sees a half-made change. Scans are one at a
    time: the caller serializes scan and apply (the FUSE layer with a lock); the scan-private
    state (``_preopened``, ``_not_images``, ``_scanned_at``) is touched by scans alone.
    Mutators check the rule (:meth:`_owned`).
    """

    def __init__(self, *, direct_io: bool = False, cache: CachePolicy | str | None = None, below_4g: int | None = None,
                 placement: Placement | None = None):
        self.nodes: dict[int, Node] = {}
        self._next = ROOT_INODE
        self._lock = threading.Lock()
        self._owner_thread = threading.get_ident()
        self.direct_io = direct_io
        self.cache = cache
        self.progress: Callable[[int, int], None] | None = None  # progress(done, total) while an image is first opened
        # Where phys/ places the RAM blocks, beyond what an image records (--below-4g, --numa, --device).
        self.placement = placement if placement is not None else Placement(below_4g)
        self.images: list[Image] = []
        self.root: DirNode | None = None
        self.convert_dir: DirNode | None = None  # directory mode only
        self.converter: ConvertManager | None = None
        self.mountpoint: str | None = None  # set by the daemon (convert/ looks for open files)
        self.reader_name: str | None = None  # --user: the account images are read as
        # Single-image mode: the image's descriptor, opened before the mount (and before a
        # --user drop), and when its owner and mode were last looked at.
        self._image_fd: int | None = None
        self._checked_at = 0.0
        # Directory mode: name -> (dev, ino, fd) opened as root before a --user drop.
        self._preopened: dict[bytes, tuple[int, int, int]] = {}
        self._dir_fd: int | None = None
        self._entries: dict[bytes, tuple[EntryKey, DirNode]] = {}
        self._not_images: dict[bytes, EntryKey] = {}
        self._scanned_at = 0.0
        # Called with (parent inode, name) when directory mode drops or replaces an entry, so
        # the FUSE layer can make the kernel forget its cached dentry at once.
        self.on_entry_gone: Callable[[int, bytes], None] | None = None
        self._closers: list[Callable[[], None]] = []  # views of published conversions

    def _owned(self) -> None:
        if threading.get_ident() != self._owner_thread:
            raise RuntimeError("the tree is changed only by the thread that owns it (see Tree)")

    def new_inode(self) -> int:
        with self._lock:
            ino = self._next
            self._next += 1
            return ino

    # -- building (detached subtrees: any thread) ----------------------------------------
    def _link(self, parent: DirNode, node: _N) -> _N:
        parent.children[node.name] = node
        return node

    def mkdir(self, parent: DirNode, name: bytes, mtime_ns: int, **kw: Any) -> DirNode:
        existing = parent.children.get(name)
        if isinstance(existing, DirNode):
            return existing
        kw.setdefault("owner", parent.owner)  # a subtree mirrors one source
        return self._link(parent, DirNode(self.new_inode(), name, mtime_ns, **kw))

    def static(self, parent: DirNode, name: bytes, mtime_ns: int, data: bytes) -> StaticFile:
        return self._link(parent, StaticFile(self.new_inode(), name, mtime_ns, parent.owner, size=len(data),
                                             blocks=(len(data) + 511) // 512, data=data))

    def view(self, parent: DirNode, name: bytes, mtime_ns: int, view: View, *, blocks: int | None = None) -> ViewFile:
        """A file served by ``view`` (ramfs.views); ``st_blocks`` counts what holds data."""
        if blocks is None:
            blocks = sum(b - a for a, b in view.populated_ranges()) // 512
        return self._link(parent, ViewFile(self.new_inode(), name, mtime_ns, parent.owner, size=view.size,
                                           blocks=blocks, view=view))

    def status(self, parent: DirNode, name: bytes, mtime_ns: int, render: Callable[[], bytes]) -> StatusFile:
        return self._link(parent, StatusFile(self.new_inode(), name, mtime_ns, parent.owner, render=render))

    # -- changing (the owning thread only) -------------------------------------------------
    def _register(self, node: Node) -> None:
        """Make a built subtree reachable by inode."""
        stack = [node]
        while stack:
            n = stack.pop()
            self.nodes[n.inode] = n
            if isinstance(n, DirNode):
                stack.extend(n.children.values())

    def add_conversion(self, name: bytes, owner: Owner, conversion: Conversion) -> ConversionFile:
        self._owned()
        node = ConversionFile(self.new_inode(), name, time.time_ns(), owner, conversion=conversion)
        assert self.convert_dir is not None  # convert/ exists in directory mode, the only one with conversions
        self._link(self.convert_dir, node)
        self._register(node)
        return node

    def replace(self, old: Node, new: Node | None) -> None:
        """convert/: the file being written becomes the finished image (same inode) or goes."""
        self._owned()
        parent = self.convert_dir
        assert parent is not None  # convert/ exists in directory mode, the only one with conversions
        if parent.children.get(old.name) is old:
            del parent.children[old.name]
        self.nodes.pop(old.inode, None)
        if new is not None:
            self._link(parent, new)
            self._register(new)

    def keep(self, close: Callable[[], None]) -> None:
        self._closers.append(close)

    def close(self) -> None:
        for img in self.images:
            img.close()
        self.images.clear()
        for _, _, fd in self._preopened.values():
            os.close(fd)
        self._preopened.clear()
        for close in self._closers:
            close()
        self._closers.clear()
        if self._image_fd is not None:
            os.close(self._image_fd)
            self._image_fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- single image ------------------------------------------------------------------
    def open_image_file(self, path: str) -> None:
        """Open the image to mount, before the mount exists (and before --user drops
        privileges, so USER needs no access to it). A FIFO or device is refused here."""
        self._image_fd = open_regular(path)

    def mount_image(self, path: str) -> None:
        self._owned()
        if self._image_fd is None:
            self.open_image_file(path)
        assert self._image_fd is not None  # open_image_file set it
        st = os.fstat(self._image_fd)  # the path may not be ours to stat (--user)
        if is_qcow2(os.pread(self._image_fd, 4, 0)):
            # A qcow2 disk: its snapshots with VM state, each opened when first looked in.
            root = DirNode(self.new_inode(), b"", st.st_mtime_ns, Owner.of(st), dynamic=True)
            assert root.inode == ROOT_INODE
            self._fill_snapshots(root, path, self._image_fd, st)
            self._register(root)
            self.root = root
            return
        # The image keeps a descriptor of its own: ours stays to watch the owner and mode.
        img = open_image(path, cache=self.cache, direct_io=self.direct_io, fd=os.dup(self._image_fd),
                         progress=self.progress)
        self.images.append(img)
        root = DirNode(self.new_inode(), b"", st.st_mtime_ns, Owner.of(st))
        assert root.inode == ROOT_INODE
        self.fill_image_dir(root, img, st.st_mtime_ns)
        self._register(root)
        self.root = root

    def _fill_snapshots(self, d: DirNode, path: str, fd: int, st: os.stat_result) -> int:
        """``snapshots/<name>/`` under ``d`` for each internal snapshot of the qcow2 file
        open as ``fd`` that has VM state (each pending, with a descriptor of its own); the
        number of them. The file is only read, never locked (docs/formats.md)."""
        from ramfs.image.qcow2 import snapshots_with_state

        snaps = snapshots_with_state(path, os.dup(fd))
        if not snaps:
            return 0
        top = self.mkdir(d, b"snapshots", st.st_mtime_ns)
        for sn in snaps:
            comps, _ = escape(sn.name or sn.id)
            name = b"%".join(comps) if len(comps) > 1 else comps[0]  # one level: a '/' in a name escaped
            if name in top.children:
                name += b"%@" + sn.id.encode()
            self._link(top, DirNode(self.new_inode(), name, sn.date_sec * 10**9 + sn.date_nsec, d.owner,
                                    pending=True, dynamic=True, path=path, fd=os.dup(fd), snapshot=sn.index))
        return len(snaps)

    def refresh_owners(self) -> None:
        """Single-image mode: take a changed owner or mode of the image (its fstat), at most
        once a second. Directory mode does the same in :meth:`apply`. Cheap: no I/O."""
        now = time.monotonic()
        if self._image_fd is None or self.root is None or now - self._checked_at < RESCAN_INTERVAL:
            return
        self._checked_at = now
        try:
            self.root.owner.update(os.fstat(self._image_fd))
        except OSError as e:
            log.warning("cannot stat the image: %s", e.strerror)

    def fill_image_dir(self, d: DirNode, img: Image, mtime: int) -> None:
        """Build the tree of one image under ``d`` (detached or not yet visible)."""
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
            self.view(leaf_ram, name, mtime, BlockView(img, blk), blocks=blk.populated_pages * blk.page_size // 512)
            text = "".join(f"{a} {b}\n" for a, b in blk.populated_ranges()).encode()
            self.static(leaf_maps, name, mtime, text)
        self._fill_cpus(d, img, mtime)
        self._fill_phys(d, img, maps, mtime)
        self._fill_export(d, img, mtime)
        facts = json.dumps(describe(img, placement=self.placement), indent=2).encode() + b"\n"
        self.static(d, b"image.json", mtime, facts)
        if img.layout.vmdesc is not None:
            self.static(d, b"devices.json", mtime, img.layout.vmdesc)
        if img.domain_xml is not None:
            self.static(d, b"domain.xml", mtime, img.domain_xml.encode())
        if img.cookie_xml is not None:
            self.static(d, b"cookie.xml", mtime, img.cookie_xml.encode())

    def _fill_phys(self, d: DirNode, img: Image, maps: DirNode, mtime: int) -> None:
        """phys/memory (guest-physical addresses) and phys/core.elf, when the machine is known."""
        try:
            pmap = self.placement.map(img)
        except RamfsError as e:  # e.g. a --below-4g that makes ranges overlap: no phys/ only
            log.warning("%s: no phys/: %s", img.path, e)
            return
        if not pmap.ranges:
            return
        view = PhysView(img, pmap)
        phys = self.mkdir(d, b"phys", mtime)
        populated = list(view.populated_ranges())
        self.view(phys, b"memory", mtime, view, blocks=sum(b - a for a, b in populated) // 512)
        text = "".join(f"{a} {b}\n" for a, b in populated).encode()
        self.static(self.mkdir(maps, b"@phys", mtime), b"memory", mtime, text)
        try:
            core = ElfCore(view, cpus_of(img))
        except RamfsError as e:
            log.warning("%s: no core.elf: %s", img.path, e)
            return
        # Its data: the header and notes, then the populated ranges just walked for memory.
        self.view(phys, b"core.elf", mtime, core, blocks=(len(core.header) + sum(b - a for a, b in populated)) // 512)

    def _fill_export(self, d: DirNode, img: Image, mtime: int) -> None:
        """export/sequential.img: the image as a classic sequential save image (for QEMU < 9.0
        and libvirt < 11.2), produced on read; its size is exact before the first read."""
        from ramfs.views.export import SequentialExport
        if img.data is None:
            return
        try:
            export = SequentialExport(img)
        except RamfsError as e:
            log.warning("%s: no export/: %s", img.path, e)
            return
        self.view(self.mkdir(d, b"export", mtime), b"sequential.img", mtime, export)

    def _fill_cpus(self, d: DirNode, img: Image, mtime: int) -> None:
        """cpus.json: the vCPU registers, decoded from the device state through the vmdesc."""
        from ramfs.format.vmstate import guest_cpus, parse_devices
        if img.data is None or img.layout.vmdesc is None:
            return
        try:
            target, cpus = guest_cpus(parse_devices(img.data, img.layout))
        except RamfsError as e:
            log.warning("%s: no cpus.json: %s", img.path, e)
            self.static(d, b"cpus.json", mtime, json.dumps({"error": str(e)}).encode() + b"\n")
            return
        if target not in (None, "x86", "aarch64"):
            # Never another target's register names on these values: say what is not known.
            data = {"target": target, "error": "the registers of this target are not decoded"}
            self.static(d, b"cpus.json", mtime, json.dumps(data).encode() + b"\n")
            return
        self.static(d, b"cpus.json", mtime, json.dumps([c.to_dict() for c in cpus], indent=2).encode() + b"\n")

    def _subdir(self, parent: DirNode, name: bytes, mtime: int) -> DirNode:
        existing = parent.children.get(name)
        if existing is not None and not existing.is_dir:
            # A file took this name first; move it aside by the same marker rule.
            del parent.children[name]
            existing.name = name + COLLISION_MARK
            parent.children[existing.name] = existing
        return self.mkdir(parent, name, mtime)

    # -- directory mode ----------------------------------------------------------------
    def open_directory(self, path: str, *, convert_jobs: int = 1) -> None:
        """The root-side half of a directory mount: the directory's descriptor, the convert
        manager, and a descriptor on each regular file there now (for --user, which reads
        them after dropping privileges). Nothing is parsed here."""
        self.backing = os.path.realpath(path)
        try:
            self._dir_fd = os.open(self.backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageIOError(f"cannot open the directory {self.backing}: {e.strerror}", e.errno) from None
        self.converter = ConvertManager(self.backing, self._dir_fd, jobs=convert_jobs, direct_io=self.direct_io)
        stale = self.converter.cleanup_stale()
        if stale:
            log.info("removed %d stale conversion temporaries from %s", stale, self.backing)
        for entry in os.scandir(self._dir_fd):
            name = os.fsencode(entry.name)
            if name.startswith(TMP_PREFIX.encode()):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                fd = open_regular(entry.name, dir_fd=self._dir_fd, follow=False, expect=st)
            except (OSError, RamfsError):
                continue  # the scan after the drop says why, if it is still there
            self._preopened[name] = (st.st_dev, st.st_ino, fd)

    def mount_directory(self, path: str | None = None, *, convert_jobs: int = 1) -> None:
        self._owned()
        if self._dir_fd is None:
            assert path is not None  # the directory was not opened before: its path is needed
            self.open_directory(path, convert_jobs=convert_jobs)
        assert self._dir_fd is not None and self.converter is not None  # open_directory set both
        st = os.fstat(self._dir_fd)
        self._dir_owner = Owner.of(st)
        root = DirNode(self.new_inode(), b"", st.st_mtime_ns, self._dir_owner, dynamic=True)
        # convert/ is where the backing directory's writers may write: it mirrors its owner
        # and mode, write bits and sticky bit included, and the kernel checks them first.
        self.convert_dir = self.mkdir(root, CONVERT_DIR, st.st_mtime_ns, writable=True, dynamic=True)
        self.status(self.convert_dir, b"STATUS", st.st_mtime_ns, self.converter.status_text)
        self._register(root)
        self.root = root
        self.rescan(force=True)

    def rescan_due(self) -> bool:
        return self._dir_fd is not None and time.monotonic() - self._scanned_at >= RESCAN_INTERVAL

    def rescan(self, force: bool = False) -> None:
        """Scan and apply in this thread (mount time, tests): the owning thread only."""
        plan = self.scan(force)
        if plan is not None:
            self.apply(plan)

    def scan(self, force: bool = False) -> ScanPlan | None:
        """What changed in the backing directory (blocking: a worker thread; one at a time).
        None when the last scan is recent. New and changed images are opened here."""
        if self.root is None or self._dir_fd is None:
            return None
        now = time.monotonic()
        if not force and now - self._scanned_at < RESCAN_INTERVAL:
            return None
        self._scanned_at = now
        try:
            plan = ScanPlan(os.fstat(self._dir_fd))
            it = os.scandir(self._dir_fd)
        except OSError as e:
            log.error("cannot list %s: %s", self.backing, e.strerror)
            return None
        seen: set[bytes] = set()
        with it:
            for entry in it:
                name = os.fsencode(entry.name)
                if name.startswith(TMP_PREFIX.encode()):
                    continue  # our own temporaries
                try:
                    # Symlinks are never followed: nothing outside the directory is shown.
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except PermissionError:
                    # --user on a directory USER may list but not search: what was opened
                    # before the drop is known by its descriptor; anything else says why.
                    st = None
                except OSError:
                    continue
                if name == CONVERT_DIR:
                    if name not in self._not_images:
                        log.warning("%s/convert is not shown: the mount's convert/ directory has that name "
                                    "(rename the file, e.g. to convert.save, and it shows)", self.backing)
                        self._not_images[name] = ()
                    continue
                old = self._entries.get(name)
                if st is None:
                    if old is not None:
                        seen.add(name)
                        continue
                    pre = self._preopened.get(name)
                    st = os.fstat(pre[2]) if pre is not None else None
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else ("unreadable",)
                if old is not None and old[0] == key:
                    assert st is not None  # an entry we could not stat with an old one was skipped above
                    seen.add(name)
                    plan.owners.append((old[1].owner, st))  # chmod/chown: shown within a rescan
                    continue
                if self._not_images.get(name) == key:
                    continue
                node = self._new_entry(name, st) if st is not None else self._unreadable(name)
                if node is None:
                    self._not_images[name] = key
                    continue
                seen.add(name)
                plan.added.append((name, key, node))
        plan.dropped = [name for name in self._entries if name not in seen]
        for name in list(self._not_images):
            if name not in seen and name != CONVERT_DIR:
                self._not_images.pop(name, None)
        return plan

    def apply(self, plan: ScanPlan) -> None:
        """Make the tree show what :meth:`scan` found (the owning thread only)."""
        self._owned()
        if plan.dir_stat is not None:
            self._dir_owner.update(plan.dir_stat)
        for owner, st in plan.owners:
            owner.update(st)
        for name in plan.dropped:
            self._drop(name)
        for name, key, node in plan.added:
            if name in self._entries:
                self._drop(name)
            self._entries[name] = (key, node)
            assert self.root is not None  # scan() makes plans only once the root exists
            self._link(self.root, node)
            self._register(node)

    def _unreadable(self, name: bytes) -> DirNode:
        """An entry that cannot even be looked up as the user the mount reads as."""
        path = os.path.join(self.backing, os.fsdecode(name))
        assert self.root is not None  # called by scan(), only once the root exists
        d = DirNode(self.new_inode(), name, self.root.mtime_ns, self._dir_owner, dynamic=True, path=path)
        who = f" (the mount reads images as {self.reader_name})" if self.reader_name else ""
        self.static(d, b"ERROR", d.mtime_ns, f"cannot open {path}: Permission denied{who}\n".encode())
        return d

    def _new_entry(self, name: bytes, st: os.stat_result) -> DirNode | None:
        """The directory of a new (or changed) image, its file opened now; None when the
        entry is not a save image. A file we may not read shows with an ERROR."""
        path = os.path.join(self.backing, os.fsdecode(name))
        d = DirNode(self.new_inode(), name, st.st_mtime_ns, Owner.of(st), pending=True, dynamic=True, path=path)
        pre = self._preopened.pop(name, None)
        if pre is not None and pre[:2] == (st.st_dev, st.st_ino):
            fd = pre[2]
        else:
            if pre is not None:
                os.close(pre[2])
            try:
                fd = open_regular(os.fsdecode(name), dir_fd=self._dir_fd, follow=False, expect=st, label=path)
            except ImageIOError as e:
                if e.errno in (errno.EACCES, errno.EPERM):
                    who = f" (the mount reads images as {self.reader_name})" if self.reader_name else ""
                    d.pending = False
                    self.static(d, b"ERROR", st.st_mtime_ns, f"{e}{who}\n".encode())
                    return d
                log.debug("%s: %s", path, e)
                return None  # gone, swapped, a symlink now: the next scan sees what is there
        try:
            head = os.pread(fd, 16, 0)
        except OSError:
            head = b""
        if is_qcow2(head):
            # A qcow2 disk shows when it has snapshots with VM state: snapshots/<name>/.
            d.pending = False
            try:
                found = self._fill_snapshots(d, path, fd, st)
            except (RamfsError, OSError) as e:
                log.debug("%s: %s", path, e)
                found = 0
            finally:
                os.close(fd)
            return d if found else None
        if not (head in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL) or head[:4] == QEMU_VM_FILE_MAGIC_BYTES):
            os.close(fd)
            return None
        d.fd = fd
        return d

    def _drop(self, name: bytes) -> None:
        _, d = self._entries.pop(name)
        assert self.root is not None  # entries exist only under the root
        if self.root.children.get(name) is d:
            del self.root.children[name]
        with self._lock:
            fd, d.fd = d.fd, None
        if fd is not None:
            os.close(fd)
        if self.on_entry_gone is not None:
            self.on_entry_gone(self.root.inode, name)

    def build_image(self, d: DirNode) -> tuple[DirNode, Image | None]:
        """Open the image behind ``d`` and build its tree, detached (blocking: a worker
        thread). :meth:`attach_image` shows it."""
        staging = DirNode(d.inode, d.name, d.mtime_ns, d.owner)
        path = d.path
        with self._lock:
            fd, d.fd = d.fd, None
        if fd is None:  # dropped meanwhile
            self.static(staging, b"ERROR", d.mtime_ns, f"{path} was removed or replaced\n".encode())
            return staging, None
        assert path is not None  # a directory with an image descriptor has the image's path
        try:
            img = open_image(path, cache=self.cache, direct_io=self.direct_io and d.snapshot is None, fd=fd,
                             progress=self.progress, snapshot=d.snapshot)
        except RamfsError as e:
            log.warning("%s: %s", path, e)
            self.static(staging, b"ERROR", d.mtime_ns, f"{e}\n".encode())
            return staging, None
        except OSError as e:
            log.warning("%s: %s", path, e.strerror)
            self.static(staging, b"ERROR", d.mtime_ns, f"cannot read {path}: {e.strerror}\n".encode())
            return staging, None
        try:
            self.fill_image_dir(staging, img, d.mtime_ns)
        except BaseException:
            img.close()
            raise
        return staging, img

    def attach_image(self, d: DirNode, built: tuple[DirNode, Image | None]) -> None:
        """Show what :meth:`build_image` built (the owning thread only)."""
        self._owned()
        staging, img = built
        if img is not None:
            self.images.append(img)
        for child in staging.children.values():
            self._link(d, child)
            self._register(child)
        d.pending = False

    def populate(self, d: DirNode) -> None:
        """Build and attach in this thread (the owning thread only)."""
        if d.pending:
            self.attach_image(d, self.build_image(d))
