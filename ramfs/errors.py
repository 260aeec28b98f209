"""The one exception hierarchy of ramfs.

Every error ramfs raises on purpose derives from :class:`RamfsError` and carries a message
fit for a user: the FUSE layer maps the hierarchy to errno in one place, the CLI prints
``str(error)`` on one line. Format errors name the file offset and what was expected there,
because a forensic user holding a damaged image needs to know *where* it broke.
"""

from __future__ import annotations


class RamfsError(Exception):
    """Base of every ramfs error."""


class FormatError(RamfsError):
    """The bytes do not follow the format (bad magic, bad field, inconsistent layout)."""

    def __init__(self, message: str, offset: int | None = None):
        self.offset = offset
        self.detail = message
        super().__init__(message if offset is None else f"{message} (at offset {offset:#x})")


class TruncatedError(FormatError):
    """The data ends before a structure that must be there."""


class UnsupportedError(FormatError):
    """Valid for QEMU or libvirt, but a feature ramfs does not handle (XBZRLE, RDMA, ...)."""


class IncompleteImageError(FormatError):
    """libvirt never finished this save (``LibvirtQemudPart`` magic)."""


class NotAnImageError(FormatError):
    """Neither a libvirt save image nor a QEMU migration stream."""


class ImageIOError(RamfsError):
    """Reading or writing a file failed at the OS level; wraps the OSError."""

    def __init__(self, message: str, errno: int | None = None):
        self.errno = errno
        super().__init__(message)


class CacheError(RamfsError):
    """The on-disk index or decompression cache could not be used."""
