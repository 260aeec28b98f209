"""Where ramfs keeps what it computes once per image: page indexes, decompressed streams.

Entries are keyed by the image's real path, size, mtime, inode and device, so an image that
changes gets a new entry and a stale one is never used. Writes go to a temporary name and are
renamed into place, so a crash never leaves a half-written entry under a valid name.

Layout of a cache directory (docs/design.md §4.2)::

    CACHEDIR.TAG              marks the directory as ramfs's (and tells backup tools to skip it)
    index/KEY.idx KEY.json    a sequential image's page index, and what it was made from
    data/KEY.stream KEY.idx KEY.json
                              a compressed image: its decompressed stream, the index that
                              points into it, and what it was made from

Every entry has a small JSON metadata file (the image path and its identity, kind, created,
whether it is kept after use); its mtime is when the entry was last used. Decompressed
streams count against a size limit and are evicted least recently used first; an open
stream holds a shared ``flock`` so that eviction (which needs an exclusive one) never takes
a file a mount reads. Indexes are small (at most 1/512 of the guest's RAM, usually far less)
and exempt from the limit. Directories are created 0700 and files 0600: an index names a
guest's blocks and devices, a stream *is* its memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramfs.errors import CacheError, RamfsError

CACHE_FORMAT_VERSION = 3

TAG_NAME = "CACHEDIR.TAG"
# https://bford.info/cachedir/: the signature tells tar, borg, restic ... to skip the directory.
TAG = (b"Signature: 8a477f597d28d172789f06886806bc55\n"
       b"# This file is a cache directory tag created by ramfs (ramfs cache list, ramfs cache clean).\n"
       b"# For information about cache directory tags see https://bford.info/cachedir/\n")

INDEX = "index"  # a sequential image's page index
DECOMPRESSED = "decompressed"  # a compressed image's stream and its index
# kind -> (subdirectory, the file whose presence makes the entry, the other files)
_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    INDEX: ("index", ".idx", ()),
    DECOMPRESSED: ("data", ".stream", (".idx",)),
}
_KEY = re.compile(r"[0-9a-f]{32}")
# Temporaries of atomic_tmp: ".KEY.EXT.tmp-PID"
_TMP = re.compile(r"\.([0-9a-f]{32})\.(idx|stream|json)\.tmp-(\d+)")

# Kept decompressed data may use this share of what it could use (the free space of its file
# system plus what it already takes), unless --cache-max / RAMFS_CACHE_MAX say otherwise.
DEFAULT_MAX = "50%"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get("RAMFS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ramfs"


def user_cache_dir(user: str) -> Path:
    """The cache of a ``--user USER`` mount: not under root's home (0700, unreachable after
    the drop), owned by USER."""
    return Path("/var/cache/ramfs") / f"user-{user}"


def image_key(path: str, st: os.stat_result) -> str:
    ident = "\0".join(str(x) for x in (
        CACHE_FORMAT_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def atomic_tmp(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@dataclass(frozen=True)
class CachePolicy:
    """How an open uses the cache (the CLI's --cache-dir, --no-cache, --rebuild-cache,
    --keep-cache, --cache-max)."""

    directory: str | os.PathLike[str] | None = None  # None: RAMFS_CACHE_DIR, XDG_CACHE_HOME, ~/.cache
    enabled: bool = True  # False: nothing read from or written to the cache
    rebuild: bool = False  # ignore existing entries of this image and replace them
    keep: bool = False  # keep decompressed data after the image is closed
    max_size: str | None = None  # "20G", "50%"; None: RAMFS_CACHE_MAX, else DEFAULT_MAX

    @property
    def root(self) -> Path:
        return cache_dir(self.directory)

    def limit_spec(self) -> str:
        return self.max_size or os.environ.get("RAMFS_CACHE_MAX") or DEFAULT_MAX


# -- parsing ------------------------------------------------------------------------------

_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str, examples: str = "e.g. 20G, 512M, or 30% of the space the cache could use") -> int:
    """``2G``, ``3072M``, ``512KiB``, ``4096`` -> bytes (the command line's sizes too)."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.I)
    if not m:
        raise RamfsError(f"not a size: {text!r} ({examples})")
    return int(m.group(1)) << _UNITS[m.group(2).upper()]


def parse_limit(text: str) -> tuple[int, bool]:
    """``20G`` -> (20 GiB, False); ``30%`` -> (30, True)."""
    m = re.fullmatch(r"(\d+)\s*%", text.strip())
    if m:
        pct = int(m.group(1))
        if pct > 100:
            raise RamfsError(f"not a share: {text!r} (at most 100%)")
        return pct, True
    return parse_size(text), False


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip())
    if not m:
        raise RamfsError(f"not an age: {text!r} (a number and a unit: 30m, 12h, 7d, 2w)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


# -- creating -----------------------------------------------------------------------------

def ensure_dir(root: Path, sub: str | None = None) -> Path:
    """``root`` (and ``root/sub``) with every missing component created 0700, never
    chmod-ed afterwards; the cache tag written (0600) when the root is new."""
    missing = []
    p = root.absolute()
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    tag = root / TAG_NAME
    if not tag.exists():
        with contextlib.suppress(FileExistsError):
            fd = os.open(tag, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, TAG)
            finally:
                os.close(fd)
    if sub is None:
        return root
    d = root / sub
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    return d


def entry_file(root: Path, kind: str, key: str, ext: str) -> Path:
    return root / _KINDS[kind][0] / f"{key}{ext}"


def main_file(root: Path, kind: str, key: str) -> Path:
    return entry_file(root, kind, key, _KINDS[kind][1])


def write_meta(root: Path, kind: str, key: str, image: str, st: os.stat_result, keep: bool,
               snapshot: str | None = None) -> None:
    """The entry's metadata (0600, atomically): what `ramfs cache list` shows."""
    meta = {"ramfs_cache": CACHE_FORMAT_VERSION, "kind": kind, "image": os.path.realpath(image),
            "snapshot": snapshot, "image_size": st.st_size, "image_mtime_ns": st.st_mtime_ns,
            "image_ino": st.st_ino, "image_dev": st.st_dev, "created": time.time(), "keep": keep}
    _write_json(entry_file(root, kind, key, ".json"), meta)


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    tmp = atomic_tmp(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_meta(root: Path, kind: str, key: str) -> dict[str, Any] | None:
    try:
        with open(entry_file(root, kind, key, ".json"), "rb") as f:
            meta = json.loads(f.read(65536))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def touch(root: Path, kind: str, key: str) -> None:
    """Mark the entry as used now (its metadata's mtime is its last use)."""
    with contextlib.suppress(OSError):
        os.utime(entry_file(root, kind, key, ".json"))


def set_keep(root: Path, kind: str, key: str) -> None:
    """Someone asked to keep this entry (`ramfs index`, --keep-cache): it stays after use."""
    meta = read_meta(root, kind, key)
    if meta is not None and not meta.get("keep"):
        meta["keep"] = True
        with contextlib.suppress(OSError):
            _write_json(entry_file(root, kind, key, ".json"), meta)


# -- decompressed streams in use --------------------------------------------------------

def lock_shared(fd: int) -> bool:
    """Hold the stream open against eviction. False if it was removed meanwhile (an evictor
    held the exclusive lock while it unlinked it): then it is no entry any more."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    return os.fstat(fd).st_nlink > 0


class HeldStream:
    """A decompressed stream some open image reads (its descriptor holds ``LOCK_SH``). When
    the image is closed, an entry nobody asked to keep is removed if no one else holds it:
    decompressed guest memory does not outlive its use unless asked to."""

    def __init__(self, root: Path, key: str, fd: int, keep: bool):
        self.root = root
        self.key = key
        self.fd = fd
        self.keep = keep

    def release(self) -> None:
        """Before the descriptor is closed (the lock goes with it)."""
        meta = read_meta(self.root, DECOMPRESSED, self.key)
        if self.keep or (meta is not None and meta.get("keep")):
            touch(self.root, DECOMPRESSED, self.key)
            return
        try:
            # Another holder (a second mount of the same image) keeps its shared lock: then
            # the last one to close removes it.
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        path = main_file(self.root, DECOMPRESSED, self.key)
        try:
            same = os.stat(path).st_ino == os.fstat(self.fd).st_ino  # not replaced by a rebuild
        except OSError:
            same = False
        if same:
            _remove_entry_files(self.root, DECOMPRESSED, self.key)


def _remove_entry_files(root: Path, kind: str, key: str) -> None:
    # The main file first: once it is gone no new open finds the entry.
    sub, main, others = _KINDS[kind]
    for ext in (main, *others, ".json"):
        with contextlib.suppress(FileNotFoundError):
            (root / sub / f"{key}{ext}").unlink()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Whether nobody holds ``path`` open with a lock, holding it meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        yield True  # gone already (or not ours to open: then not ours to judge either)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


# -- listing ------------------------------------------------------------------------------

@dataclass
class Entry:
    kind: str
    key: str
    files: list[Path]
    disk_bytes: int  # allocated (a sparse stream counts what it takes, not its length)
    last_used: float
    meta: dict[str, Any] | None
    in_use: bool = False
    state: str = "ok"  # ok, changed, missing, unknown (cannot look), orphan (no metadata)
    keep: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> str | None:
        return self.meta.get("image") if self.meta else None

    @property
    def created(self) -> float | None:
        v = self.meta.get("created") if self.meta else None
        return float(v) if isinstance(v, (int, float)) else None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "image": self.image, "image_state": self.state,
                "bytes": self.disk_bytes, "created": self.created, "last_used": self.last_used,
                "in_use": self.in_use, "keep": self.keep, "files": [str(f) for f in self.files]}


def looks_like_cache(root: Path) -> bool:
    """Ours: it has our tag, or (made by a ramfs before the tag) an index/ or data/
    directory holding nothing but our file names."""
    try:
        with open(root / TAG_NAME, "rb") as f:
            tag = f.read(4096)
    except OSError:
        tag = b""
    if tag.startswith(TAG[:43]) and b"created by ramfs" in tag:
        return True
    found = False
    for sub, _, _ in _KINDS.values():
        d = root / sub
        if not d.is_dir():
            continue
        names = os.listdir(d)
        if any(not _ours(n) for n in names):
            return False
        found = True
    return found


def _ours(name: str) -> bool:
    return bool(_TMP.fullmatch(name)) or bool(re.fullmatch(r"[0-9a-f]{32}\.(idx|stream|json)", name))


def image_state(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "orphan"
    try:
        st = os.stat(str(meta.get("image")))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return "missing" if e.errno == errno.ENOTDIR else "unknown"
    same = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) == (
        meta.get("image_size"), meta.get("image_mtime_ns"), meta.get("image_ino"), meta.get("image_dev"))
    return "ok" if same else "changed"


def list_entries(root: Path, *, look: bool = True) -> list[Entry]:
    """Every entry in ``root``, least recently used first. ``look``: check whether its image
    still exists unchanged and whether a process holds it."""
    out = []
    for kind, (sub, main, others) in _KINDS.items():
        d = root / sub
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CacheError(f"cannot list the cache {d}: {err.strerror}") from None
        for name in names:
            key, dot, ext = name.partition(".")
            if f".{ext}" != main or not _KEY.fullmatch(key):
                continue
            files = [d / f"{key}{e}" for e in (main, *others, ".json")]
            files = [f for f in files if f.exists()]
            disk = 0
            last = 0.0
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    continue
                disk += st.st_blocks * 512
                # The metadata's mtime is the last use (touch); without metadata, the newest file.
                last = st.st_mtime if f.suffix == ".json" else max(last, st.st_mtime)
            meta = read_meta(root, kind, key)
            e = Entry(kind, key, files, disk, last, meta)
            e.keep = kind == INDEX or bool(meta and meta.get("keep"))
            if look:
                e.state = image_state(meta)
                if kind == DECOMPRESSED:
                    with _exclusive(d / name) as free:
                        e.in_use = not free
            out.append(e)
    out.sort(key=lambda e: e.last_used)
    return out


def leftovers(root: Path) -> list[Path]:
    """Metadata without its entry, and temporaries whose writer is gone."""
    out = []
    for sub, main, others in _KINDS.values():
        d = root / sub
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = _TMP.fullmatch(name)
            if m:
                if not pid_alive(int(m.group(3))):
                    out.append(d / name)
                continue
            key, _, ext = name.partition(".")
            if _KEY.fullmatch(key) and ext in ("json", *(e.lstrip(".") for e in others)) \
                    and not (d / f"{key}{main}").exists():
                out.append(d / name)
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: EPERM means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- removing -----------------------------------------------------------------------------

def remove(root: Path, entry: Entry) -> bool:
    """Remove an entry unless a process holds it (False then)."""
    main = main_file(root, entry.kind, entry.key)
    if entry.kind == INDEX:
        _remove_entry_files(root, entry.kind, entry.key)
        return True
    with _exclusive(main) as free:
        if not free:
            return False
        _remove_entry_files(root, entry.kind, entry.key)
    return True


def resolve_limit(root: Path, spec: str, used: int) -> int:
    """Bytes that kept decompressed data may take (``used`` is what it takes now)."""
    amount, share = parse_limit(spec)
    if not share:
        return amount
    p = root
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return used
    return (st.f_bavail * st.f_frsize + used) * amount // 100


def enforce_limit(root: Path, spec: str, protect: str | None = None) -> list[Entry]:
    """Evict decompressed streams until the rest fit the limit: first those nobody asked to
    keep that no process holds (left by a mount that died), then least recently used first.
    Entries in use, and ``protect`` (the one just made), stay. Returns what was removed."""
    entries = [e for e in list_entries(root, look=False) if e.kind == DECOMPRESSED]
    used = sum(e.disk_bytes for e in entries)
    limit = resolve_limit(root, spec, used)
    removed = []
    for e in sorted(entries, key=lambda e: (e.keep, e.last_used)):
        if e.key == protect or (e.keep and used <= limit):
            continue
        if remove(root, e):
            removed.append(e)
            used -= e.disk_bytes
    return removed


def check_ours(root: Path) -> None:
    if not looks_like_cache(root):
        raise CacheError(f"{root} does not look like a ramfs cache (no {TAG_NAME} made by ramfs, and no "
                         f"index/ or data/ holding only ramfs's files): not touched")
