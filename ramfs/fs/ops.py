"""pyfuse3 operations over a :class:`~ramfs.fs.tree.Tree`: a protocol adapter, nothing more.

Every handler goes through :func:`fuse_errors`, the one place where exceptions become errno
values: ramfs errors are EIO (logged once, one line), OSErrors keep their errno, and a bug
is logged with its traceback and answered with EIO instead of killing the daemon. Blocking
work (reads, opening images in directory mode) runs in worker threads so one slow read
never stalls the others.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast

import pyfuse3
import trio

from ramfs.errors import FormatError, ImageIOError, RamfsError
from ramfs.fs import creds
from ramfs.fs.convertdir import QUIET_SECONDS, Conversion, ConversionFailed
from ramfs.fs.tree import (BLOCK_BLKSIZE, CONVERT_DIR, ROOT_INODE, ConversionFile, DirNode, FileNode, Node, Owner,
                           StaticFile, StatusFile, Tree, ViewFile)
from ramfs.views import FileView
from ramfs.image.files import WouldBlock

log = logging.getLogger("ramfs.fs")

ENTRY_TIMEOUT = 300.0  # names never change: let the kernel cache them
# Attributes, and directory mode's names: new and removed images, and a changed owner or
# mode of an image, show within a second (default_permissions checks the cached ones).
DYNAMIC_TIMEOUT = 1.0
MAX_WORKERS = 32
# Served for ranges the guest never touched, without a thread hop or an allocation.
_ZEROS = memoryview(bytes(4 << 20))
# Largest read tried from the page cache on the event loop (a 1 MiB copy is ~0.1 ms).
NOWAIT_MAX = 1 << 20


def errno_for(exc: BaseException, *, converting: bool = False) -> int:
    """The errno a FUSE request answers with for an exception raised while serving it.

    Reading, a format error is the image's fault and the read fails with EIO. Writing into
    ``convert/``, it is the copied file's fault: ``cp`` then reports EINVAL.
    """
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, (ImageIOError, ConversionFailed)) and exc.errno:
        return exc.errno
    if converting and isinstance(exc, FormatError):
        return errno.EINVAL
    if isinstance(exc, RamfsError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _conv_errno(exc: BaseException) -> int:
    return errno_for(exc, converting=True)


def _invalidate_entry(parent_inode: int, name: bytes) -> None:
    """Make the kernel drop a cached name now (safe from worker threads)."""
    try:
        pyfuse3.invalidate_entry_async(parent_inode, name)
    except Exception as e:  # not mounted (tests call operations directly): nothing is cached
        log.debug("invalidate %r: %s", name, e)


class _StaleInvalidateFilter(logging.Filter):
    """pyfuse3's notify thread logs a traceback when the kernel no longer has the entry we
    invalidate (ENOENT): the name was already forgotten, which is what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FileNotFoundError) and "invalidate" in record.getMessage():
            log.debug("kernel had already dropped the entry: %s", exc)
            return False
        return True


logging.getLogger("pyfuse3").addFilter(_StaleInvalidateFilter())


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: _Handler) -> _Handler:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (RamfsError, OSError) as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno_for(e)) from None
        except Exception:
            log.exception("bug in %s%r; answered EIO", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return cast(_Handler, wrapper)  # the same positional arguments and result as fn


class Operations(pyfuse3.Operations):
    def __init__(self, tree: Tree):
        super().__init__()
        self.tree = tree
        self.limiter = trio.CapacityLimiter(MAX_WORKERS)
        # Writers block in their thread while the converter catches up; they get their own
        # threads so that reads are never starved by a fast copy into convert/.
        self.write_limiter = trio.CapacityLimiter(MAX_WORKERS)
        self._handles = itertools.count(1 << 40)
        self._snapshots: dict[int, bytes] = {}
        self._writers: dict[int, Conversion] = {}
        self._populating: dict[int, trio.Lock] = {}
        self._rescan_lock = trio.Lock()  # scans one at a time (the tree's threading rule)
        self.dynamic_root = tree.root is not None and tree.root.dynamic
        tree.on_entry_gone = _invalidate_entry
        # Set once the kernel's INIT has been answered (see ramfs.fs.readahead).
        self.initialized = trio.Event()

    def init(self) -> None:
        # Called by pyfuse3 inside the INIT request, before its reply: whatever waits on the
        # event runs after the reply has been written.
        self.initialized.set()

    # -- helpers ---------------------------------------------------------------------
    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _ready(self, d: DirNode) -> None:
        """Directory mode: open the image behind ``d`` once: built in a worker thread,
        attached here on the loop (the tree's threading rule)."""
        if not d.pending:
            return
        lock = self._populating.setdefault(d.inode, trio.Lock())
        async with lock:
            if d.pending:
                built = await trio.to_thread.run_sync(self.tree.build_image, d, limiter=self.limiter)
                self.tree.attach_image(d, built)

    async def _rescan(self, force: bool = False) -> None:
        """Directory mode: scan in a worker thread, apply on the loop, one scan at a time."""
        if not self.dynamic_root or not (force or self.tree.rescan_due()):
            return
        async with self._rescan_lock:
            plan = await trio.to_thread.run_sync(self.tree.scan, force, limiter=self.limiter)
            if plan is not None:
                self.tree.apply(plan)

    async def _refresh_root(self, d: DirNode) -> None:
        if d.inode == ROOT_INODE:
            await self._rescan()

    async def _refresh_owners(self) -> None:
        """A changed owner or mode of a source shows within a second, even to a process
        whose working directory is inside an image (it never looks the root up)."""
        if self.dynamic_root:
            await self._rescan()
        else:
            self.tree.refresh_owners()

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        changing = node.dynamic if isinstance(node, DirNode) else isinstance(node, (StatusFile, ConversionFile))
        a.entry_timeout = DYNAMIC_TIMEOUT if changing else ENTRY_TIMEOUT
        a.attr_timeout = DYNAMIC_TIMEOUT
        if isinstance(node, ConversionFile):
            a.entry_timeout = a.attr_timeout = 0
        a.st_uid, a.st_gid, _ = node.owner.ids
        a.st_mode = node.st_mode
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        if isinstance(node, DirNode):
            a.st_nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
            a.st_size = 0
            a.st_blksize = 4096
            a.st_blocks = 0
        else:
            assert isinstance(node, FileNode)
            a.st_nlink = 1
            a.st_size = node.size
            if isinstance(node, ConversionFile):
                assert node.conversion is not None  # Tree.add_conversion gives it one
                a.st_size = node.conversion.assembler.size
            elif isinstance(node, StatusFile):
                assert node.render is not None  # Tree.status gives it one
                a.st_size = len(node.render())
            a.st_blocks = node.blocks
            a.st_blksize = BLOCK_BLKSIZE
        return a

    # -- operations --------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(parent)
        await self._refresh_owners()
        await self._refresh_root(parent)
        await self._ready(parent)
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        await self._refresh_owners()
        return self._attrs(self._node(inode))

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._refresh_root(node)
        await self._ready(node)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        assert isinstance(node, DirNode)  # fh is the inode opendir found to be a directory
        # next_id is the 1-based position; entries are sorted so positions stay stable
        # while the directory is listed (directory mode may change between listings).
        entries = sorted(node.children.items())
        for i, (name, child) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), i):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(node, ConversionFile):
            raise pyfuse3.FUSEError(errno.EBUSY)  # still being written
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            # An image is never overwritten: copying onto a finished conversion says so.
            raise pyfuse3.FUSEError(errno.EEXIST if self._published(node) else errno.EROFS)
        if isinstance(node, StatusFile):
            fh = next(self._handles)
            assert node.render is not None  # Tree.status gives it one
            self._snapshots[fh] = node.render()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if isinstance(node, ViewFile) and self.tree.direct_io:
            # Keep guest memory out of the page cache too: it is what --direct-io is for.
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    # pyfuse3 replies with any buffer; its stub says bytes, but a copy of _ZEROS or of a
    # block's bytearray would cost what serving them without one saves.
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        if fh in self._snapshots:
            return self._snapshots[fh][off:off + size]
        node = self._node(fh)
        if isinstance(node, StaticFile):
            return node.data[off:off + size]
        if not isinstance(node, ViewFile):
            raise pyfuse3.FUSEError(errno.EBADF)
        if off >= node.size:
            return b""
        size = min(size, node.size - off)
        view = node.view
        assert view is not None  # a ViewFile is always made with its view
        if size <= len(_ZEROS) and not view.has_data(off, size):
            return _ZEROS[:size]
        if size <= NOWAIT_MAX and not self.tree.direct_io:
            # Bytes already in the host page cache are copied here, on the loop: a thread hop
            # costs more than the copy (~2x the reads per second for cached 4 KiB pages), and
            # RWF_NOWAIT guarantees this never waits for the disk. (O_DIRECT never has them.)
            try:
                return view.read(off, size, nowait=True)
            except WouldBlock:
                pass
        return await trio.to_thread.run_sync(view.read, off, size, limiter=self.limiter)

    def _published(self, node: Node) -> bool:
        """A finished conversion, shown in convert/ under its name."""
        cd = self.tree.convert_dir
        return cd is not None and isinstance(node, ViewFile) and cd.children.get(node.name) is node

    # -- the convert/ directory (directory mode) -----------------------------------------
    def _in_convert(self, parent_inode: int) -> bool:
        return self.tree.convert_dir is not None and parent_inode == self.tree.convert_dir.inode

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if not self._in_convert(parent_inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        assert self.tree.convert_dir is not None  # _in_convert: it exists
        if name in self.tree.convert_dir.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        # The file is the caller's, with the mode it asked for, exactly as if it had been
        # created in the backing directory by the caller (who must be allowed to).
        caller = creds.caller_of(ctx)
        perm = mode & ~ctx.umask & 0o777
        assert self.tree.converter is not None  # convert/ exists in directory mode, which has one
        try:
            conv = await trio.to_thread.run_sync(
                functools.partial(self.tree.converter.start, name, caller, perm), limiter=self.write_limiter)
        except (RamfsError, OSError) as e:
            log.info("convert/%s refused: %s", os.fsdecode(name), e)
            raise pyfuse3.FUSEError(_conv_errno(e)) from None
        uid, gid = (ctx.uid, ctx.gid) if creds.can_act_as_others() else (os.geteuid(), os.getegid())
        node = self.tree.add_conversion(name, Owner(uid, gid, perm), conv)
        fh = next(self._handles)
        self._writers[fh] = conv
        conv.node = node
        return pyfuse3.FileInfo(fh=fh), self._attrs(node)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        conv = self._writers.get(fh)
        if conv is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        data = bytes(buf)
        if conv.assembler.try_write(off, data):
            return len(data)
        try:
            await trio.to_thread.run_sync(conv.assembler.write, off, data, limiter=self.write_limiter)
        except (RamfsError, OSError) as e:
            raise pyfuse3.FUSEError(_conv_errno(e)) from None
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        conv = self._writers.get(fh)
        if conv is None:
            return
        if not conv.settled:
            if conv.assembler.size == 0 and await trio.to_thread.run_sync(
                    self._more_to_come, conv, limiter=self.write_limiter):
                # Nothing written yet and the file is still open elsewhere: a dup'ed
                # descriptor being closed (dd opens its output, dup2()s it to stdout and
                # closes the original; so does the shell's "> file"). The end comes later.
                return
            assert self.tree.converter is not None  # conversions exist in directory mode only
            try:
                await trio.to_thread.run_sync(self.tree.converter.finish, conv, limiter=self.write_limiter)
            except (RamfsError, OSError) as e:
                await self._conversion_over(conv)
                raise pyfuse3.FUSEError(_conv_errno(e)) from None
            await self._conversion_over(conv)
        elif conv.error is not None:
            raise pyfuse3.FUSEError(_conv_errno(conv.error))

    def _more_to_come(self, conv: Conversion) -> bool:
        """At a flush with nothing written: does the writer still hold the file open? FUSE
        does not say whether a close is the last one, so look at the creator's descriptors
        (the closing one is already gone from its table when the flush is sent). When that
        cannot be read (a --user daemon may not look at other users' processes), wait a
        moment for bytes instead: an empty copy then fails after QUIET_SECONDS."""
        pid = conv.caller.pid if conv.caller is not None else 0
        mp = self.tree.mountpoint
        ours = f"{mp}/{CONVERT_DIR.decode()}/{os.fsdecode(conv.name)}" if mp else None
        try:
            fds = os.listdir(f"/proc/{pid}/fd") if pid and ours else None
            for fd in fds or ():
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == ours:
                        return True
                except OSError:
                    continue
            if fds is not None:
                return False
        except OSError:
            pass
        deadline = time.monotonic() + QUIET_SECONDS
        while time.monotonic() < deadline:
            if conv.assembler.size:
                return True
            time.sleep(0.02)
        return conv.assembler.size > 0

    async def release(self, fh: int) -> None:
        self._snapshots.pop(fh, None)
        conv = self._writers.pop(fh, None)
        if conv is not None and not conv.settled:
            assert self.tree.converter is not None  # conversions exist in directory mode only
            # Closed without a flush we could answer: finish anyway, so nothing half-written
            # survives and a complete copy is still published.
            try:
                await trio.to_thread.run_sync(functools.partial(self.tree.converter.finish, conv, last_close=True),
                                              limiter=self.write_limiter)
            except (RamfsError, OSError) as e:  # already logged by the manager
                log.debug("release of an unfinished conversion: %s", e)
            except Exception:
                log.exception("bug finishing the conversion of %r", conv.name)
            await self._conversion_over(conv)
        return None

    async def _conversion_over(self, conv: Conversion) -> None:
        """The in-flight file becomes the finished image (read-only, same inode, served from
        the descriptor the conversion wrote through) or disappears."""
        node = conv.node
        if conv.settled:
            return
        assert isinstance(node, ConversionFile)  # create() set it before the handle was used
        d = self.tree.convert_dir
        if conv.published:
            view = FileView(conv.published_fd, conv.final_path)
            self.tree.keep(view.close)
            st = view.source.stat
            done = ViewFile(node.inode, node.name, node.mtime_ns, Owner.of(st), size=view.size,
                            blocks=st.st_blocks, view=view)
            self.tree.replace(node, done)
            conv.settled = True
            await self._rescan(force=True)
        else:
            self.tree.replace(node, None)
            assert d is not None  # convert/ exists: conversions are made in it
            _invalidate_entry(d.inode, node.name)
            conv.settled = True

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if not isinstance(node, ConversionFile):
            if self._published(node) and not fields.update_size:
                # A finished conversion: copy tools set mode and times after closing the file
                # (shutil.copy, cp -a, rsync); they are not kept, as while it was written.
                return self._attrs(node)
            raise pyfuse3.FUSEError(errno.EROFS)
        conv = node.conversion
        if fields.update_size:
            assert conv is not None  # Tree.add_conversion gives it one
            try:
                conv.assembler.truncate(attr.st_size)
            except (RamfsError, OSError) as e:
                raise pyfuse3.FUSEError(_conv_errno(e)) from None
        # Modes, owners and times of a file being converted are not kept (cp -a sets them).
        return self._attrs(node)

    async def _refuse(self, parent_inode: int, *args: object) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM if self._in_convert(parent_inode) else errno.EROFS)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(parent_inode_old)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> NoReturn:
        await self._refuse(new_parent_inode)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        node = self._node(inode)
        return not mode & os.W_OK or bool(node.st_mode & 0o200)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(n.blocks for n in self.tree.nodes.values() if isinstance(n, FileNode)) // 8
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Nodes are kept for the life of the mount (they are small); nothing to release.
        return None
