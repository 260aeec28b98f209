"""Where ramfs keeps what it computes once per image: page indexes, decompressed streams.

Entries are keyed by the image's real path, size, mtime, inode and device, so an image that
changes gets a new entry and a stale one is never used. Writes go to a temporary name and are
renamed into place, so a crash never leaves a half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_FORMAT_VERSION = 2


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get("RAMFS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ramfs"


def image_key(path: str, st: os.stat_result) -> str:
    ident = "\0".join(str(x) for x in (
        CACHE_FORMAT_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def atomic_tmp(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")
