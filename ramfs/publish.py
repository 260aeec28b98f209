"""New files that appear whole or not at all.

Every file ramfs writes for someone (``ramfs convert``, ``export``, ``phys`` and ``core``, a
copy into ``convert/``) is published the same way (docs/security.md, "Private outputs"):

1. a temporary name in the destination directory, created ``O_EXCL | O_NOFOLLOW`` with mode
   0600 (the umask can only remove bits): nothing existing is reused or followed, and nobody
   else can open it;
2. the mode asked for, if any, set while the file is empty: never a chmod after data is in;
3. the data;
4. ``fsync`` of the file;
5. a link to the final name, made from ``/proc/self/fd/N``: the inode that was written (and
   checked), not whatever the temporary's name holds by now; a link never replaces an
   existing name (``FileExistsError``);
6. ``fsync`` of the directory, so that the name survives a crash as the data does.

The temporary name is removed whatever happens. Names are resolved relative to a descriptor of
the destination directory. Errors are the ``OSError`` of the step that failed, for the caller
to word. This module imports nothing of ramfs but :mod:`ramfs.tempfiles`, so the converter,
the file system and the command line can all use it.
"""

from __future__ import annotations

import errno
import os

from ramfs import tempfiles

_CREATE = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def create_temporary(dir_fd: int, name: str, *, readable: bool = False) -> int:
    """Step 1: a new file ``name`` in ``dir_fd``, mode 0600, open for writing (and reading)."""
    return os.open(name, (os.O_RDWR if readable else os.O_WRONLY) | _CREATE, 0o600, dir_fd=dir_fd)


def reopen_direct(fd: int) -> int:
    """The inode open as ``fd`` again, for ``O_DIRECT`` writes: through ``/proc``, never by
    name (the directory may be someone else's to change meanwhile)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)


def publish(fd: int, dir_fd: int, name: str) -> None:
    """Steps 4-6: ``fsync`` the file open as ``fd``, link it as ``name`` in ``dir_fd``
    (``FileExistsError`` if the name exists), ``fsync`` the directory."""
    os.fsync(fd)
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    os.fsync(dir_fd)


def remove_temporary(dir_fd: int, name: str) -> None:
    """Remove the temporary's name, if it is still there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def exists(dir_fd: int, name: str) -> bool:
    """Whether ``name`` exists in ``dir_fd`` (a dangling symlink too)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class NewFile:
    """``path``, made by steps 1-6 beside it (for the command line's outputs).

    :meth:`create` (or entering the ``with`` block) makes the temporary, open as ``fd`` for
    writing (and reading, ``readable``); :meth:`publish` gives it its name; :meth:`close` (or
    leaving the block) closes it and removes the temporary's name, published or not.
    Meanwhile the temporary's path is registered with :mod:`ramfs.tempfiles`, for a signal
    handler to remove.
    """

    def __init__(self, path: str | os.PathLike[str], *, readable: bool = False):
        self.path = os.path.abspath(path)
        self.directory, self.name = os.path.split(self.path)
        self.tmp_name = f".{self.name}.ramfs-{os.getpid()}.tmp"
        self.tmp_path = os.path.join(self.directory, self.tmp_name)
        self.readable = readable
        self.dir_fd = -1
        self.fd = -1
        self._created = False

    def create(self) -> None:
        """Step 1 (``FileExistsError`` if ``path`` exists already)."""
        try:
            self.dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if exists(self.dir_fd, self.name):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.path)
            tempfiles.register(self.tmp_path)
            self.fd = create_temporary(self.dir_fd, self.tmp_name, readable=self.readable)
            self._created = True
        except BaseException:
            self.close()
            raise

    def publish(self) -> None:
        """Steps 4-6 (``FileExistsError`` if ``path`` appeared meanwhile)."""
        publish(self.fd, self.dir_fd, self.name)

    def close(self) -> None:
        """Close the temporary and remove its name (the published name stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            if self._created:
                remove_temporary(self.dir_fd, self.tmp_name)
                self._created = False
        finally:
            if self.dir_fd >= 0:
                os.close(self.dir_fd)
                self.dir_fd = -1
            tempfiles.unregister(self.tmp_path)

    def __enter__(self) -> NewFile:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
