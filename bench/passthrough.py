"""A minimal pyfuse3 passthrough: the ceiling of ramfs's FUSE stack, for the benchmarks.

    passthrough.py [--writeback] [--direct-io] FILE RWDIR MOUNTPOINT

serves, in the foreground until unmounted (or SIGINT/SIGTERM):

* ``MOUNTPOINT/file``: FILE, read-only, each read one ``os.pread`` in a worker thread;
* ``MOUNTPOINT/rw/``: RWDIR, where files can be created and written (each write one
  ``os.pwrite`` in a worker thread), read back, truncated and fsynced.

It does nothing ramfs would not also have to do, and runs exactly as ramfs does: pyfuse3
with trio, blocking I/O through ``trio.to_thread`` with the same thread limit, the same
mount options (``default_permissions``) and the same ``st_blksize`` (1 MiB) and caching
(buffered: ``keep_cache``; ``--direct-io``: FUSE direct I/O and ``O_DIRECT`` reads through a
page-aligned per-thread buffer, as ``ramfs mount --direct-io``). ``--writeback`` turns on the
kernel's FUSE writeback cache (``enable_writeback_cache``), which ramfs does not use.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import stat
import sys
import threading

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FILE_INO = ROOT + 1
RW_INO = ROOT + 2
BLKSIZE = 1 << 20  # as ramfs's block files
MAX_WORKERS = 32  # as ramfs.fs.ops
ALIGN = 4096


class _Tls(threading.local):
    buf: mmap.mmap | None = None


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str, rwdir: str, *, direct_io: bool, writeback: bool):
        super().__init__()
        self.enable_writeback_cache = writeback
        self.direct_io = direct_io
        self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct_io else 0))
        self.size = os.fstat(self.fd).st_size
        self.rwdir = rwdir
        self.limiter = trio.CapacityLimiter(MAX_WORKERS)
        self.names: dict[bytes, int] = {}  # rw/ entries
        self.paths: dict[int, str] = {}
        self.next_ino = RW_INO + 1
        self.fds: dict[int, int] = {}
        self.next_fh = 1
        self.tls = _Tls()
        self.uid, self.gid = os.getuid(), os.getgid()

    # -- attributes ------------------------------------------------------------------
    def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = BLKSIZE
        a.entry_timeout = a.attr_timeout = 300.0
        if inode in (ROOT, RW_INO):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            return a
        if inode == FILE_INO:
            st = os.fstat(self.fd)
            a.st_mode = stat.S_IFREG | 0o444
        else:
            st = os.stat(self.paths[inode])
            a.st_mode = stat.S_IFREG | 0o644
            a.entry_timeout = a.attr_timeout = 1.0
        a.st_nlink = 1
        a.st_size = st.st_size
        a.st_blocks = st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _rw_inode(self, name: bytes) -> int:
        ino = self.names.get(name)
        if ino is None:
            ino = self.names[name] = self.next_ino
            self.paths[ino] = os.path.join(self.rwdir, os.fsdecode(name))
            self.next_ino += 1
        return ino

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT:
            if name == b"file":
                return self._entry(FILE_INO)
            if name == b"rw":
                return self._entry(RW_INO)
        elif parent_inode == RW_INO and os.path.lexists(os.path.join(self.rwdir, os.fsdecode(name))):
            return self._entry(self._rw_inode(name))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx=None):
        return self._entry(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode in self.paths:
            if fields.update_size:
                os.truncate(self.paths[inode], attr.st_size)
            return self._entry(inode)
        raise pyfuse3.FUSEError(errno.EROFS)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            entries = [(b"file", FILE_INO), (b"rw", RW_INO)]
        else:
            entries = [(os.fsencode(n), None) for n in sorted(os.listdir(self.rwdir))]
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            ino = ino or self._rw_inode(name)
            if not pyfuse3.readdir_reply(token, name, self._entry(ino), i):
                break

    async def releasedir(self, fh):
        return None

    # -- the read-only file ----------------------------------------------------------
    def _pread(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def _pread_direct(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        lo = off & ~(ALIGN - 1)
        hi = (end + ALIGN - 1) & ~(ALIGN - 1)
        t = self.tls
        if t.buf is None or len(t.buf) < hi - lo:
            t.buf = mmap.mmap(-1, max(hi - lo, 1 << 20))
        view = memoryview(t.buf)
        got = 0
        while got < hi - lo:
            n = os.preadv(self.fd, [view[got:hi - lo]], lo + got)
            if n <= 0:
                break
            got += n
            if n & (ALIGN - 1):
                break
        data = bytes(view[off - lo:min(end, lo + got) - lo])
        view.release()
        return data

    async def open(self, inode, flags, ctx):
        if inode == FILE_INO:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EROFS)
            if self.direct_io:
                return pyfuse3.FileInfo(fh=0, direct_io=True, keep_cache=False)
            return pyfuse3.FileInfo(fh=0, keep_cache=True)
        if inode in self.paths:
            fd = os.open(self.paths[inode], flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND))
            return pyfuse3.FileInfo(fh=self._new_fh(fd))
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def read(self, fh, off, size):
        if fh == 0:
            fn = self._pread_direct if self.direct_io else self._pread
            return await trio.to_thread.run_sync(fn, off, size, limiter=self.limiter)
        return await trio.to_thread.run_sync(os.pread, self.fds[fh], size, off, limiter=self.limiter)

    # -- the writable directory ------------------------------------------------------
    def _new_fh(self, fd: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.fds[fh] = fd
        return fh

    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != RW_INO:
            raise pyfuse3.FUSEError(errno.EROFS)
        path = os.path.join(self.rwdir, os.fsdecode(name))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        ino = self._rw_inode(name)
        return pyfuse3.FileInfo(fh=self._new_fh(fd)), self._entry(ino)

    async def write(self, fh, off, buf):
        return await trio.to_thread.run_sync(os.pwrite, self.fds[fh], bytes(buf), off, limiter=self.limiter)

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        if fh in self.fds:
            await trio.to_thread.run_sync(os.fsync, self.fds[fh], limiter=self.limiter)

    async def release(self, fh):
        fd = self.fds.pop(fh, None)
        if fd is not None:
            os.close(fd)

    async def unlink(self, parent_inode, name, ctx):
        if parent_inode != RW_INO:
            raise pyfuse3.FUSEError(errno.EROFS)
        os.unlink(os.path.join(self.rwdir, os.fsdecode(name)))

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        v = os.statvfs(self.rwdir)
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = 255
        return s

    async def forget(self, inode_list):
        return None


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("rwdir")
    ap.add_argument("mountpoint")
    ap.add_argument("--writeback", action="store_true", help="enable the FUSE writeback cache")
    ap.add_argument("--direct-io", action="store_true", help="FUSE direct I/O + O_DIRECT reads of FILE")
    a = ap.parse_args(argv)
    ops = Passthrough(a.file, a.rwdir, direct_io=a.direct_io, writeback=a.writeback)
    opts = set(pyfuse3.default_options) | {"fsname=ramfs-bench-passthrough", "subtype=passthrough"}
    pyfuse3.init(ops, a.mountpoint, opts)
    clean = False
    try:
        trio.run(_serve)
        clean = True
    finally:
        pyfuse3.close(unmount=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
