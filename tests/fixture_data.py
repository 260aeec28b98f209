"""Real QEMU/libvirt save images shipped in ``tests/data`` (stdlib only).

The firmware/ and libvirt/ fixtures of ``../shared/fixtures`` are packed by
``scripts/pack-fixtures.py`` into one solid archive, ``tests/data/fixtures.tar.xz``
(see ``tests/data/README.md``).  The small text files (``*.xml``,
``*-ramblock.txt``, ``*-mtree.txt``) sit beside it as they are.

API::

    DATA_DIR                      # tests/data
    MANIFEST                      # list of manifest entries (dicts), see tests/data/manifest.json
    entries(kind=None, **filters) # select entries, e.g. entries("image", qemu_encoding="mapped-ram")
    entry(decompressed_path)      # the one entry for a path
    fixture_path(decompressed_path) -> pathlib.Path

``fixture_path`` extracts the archive once per archive version into
``${RAMFS_TEST_CACHE:-~/.cache/ramfs-tests}/fixtures-<sha256[:16] of the archive>/``:
into a temporary directory first, checking every file's sha256 and size against the
manifest, then renamed into place atomically, under an ``fcntl.flock`` lock so that
concurrent test processes do not race.  Zero pages are written as holes, so the
mapped-ram images (about 70 MiB each, mostly zeros) come out sparse.  Extracted files
are made read-only: copy one (``conftest.mutable``) before changing it.

This module must not import ramfs: it describes the test data, not the code under test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST_FILE = DATA_DIR / "manifest.json"

with open(MANIFEST_FILE, encoding="utf-8") as _f:
    MANIFEST_META: dict[str, Any] = json.load(_f)

#: One dict per shipped file (images, ground-truth dumps, xml/txt info files).
MANIFEST: list[dict[str, Any]] = MANIFEST_META["files"]
#: The two blobs loaded into every firmware guest (address, size, sha256, recipe).
BLOBS: list[dict[str, Any]] = MANIFEST_META.get("blobs", [])

_BY_PATH: dict[str, dict[str, Any]] = {e["decompressed_path"]: e for e in MANIFEST}

REPO_DIR = DATA_DIR.parent.parent
STAMP = ".verified"
_CHUNK = 1 << 20
_PAGE = 4096
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(_PAGE)


class FixtureError(RuntimeError):
    """The packed test data is missing, damaged or does not match the manifest."""


# --------------------------------------------------------------------------- selection

def entry(decompressed_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest entry of one shipped file, e.g. ``entry('firmware/pc-sequential.img')``."""
    key = Path(decompressed_path).as_posix()
    try:
        return _BY_PATH[key]
    except KeyError:
        raise KeyError(
            f"{key!r} is not in tests/data/manifest.json (only firmware/ and libvirt/ "
            "are shipped; a Linux guest is built at test time: qemu_images.build_linux)"
        ) from None


def _matches(value: Any, want: Any) -> bool:
    if callable(want):
        return bool(want(value))
    if isinstance(value, dict) and "name" in value and isinstance(want, str):
        return value["name"] == want  # libvirt_format="sparse"
    return value == want


def entries(kind: str | Iterable[str] | None = None, **filters: Any) -> list[dict[str, Any]]:
    """Manifest entries with the given ``kind`` ('image', 'ground-truth', 'xml', 'info', or
    several of them) whose fields equal each of ``filters``.

    A filter value may be a callable taking the field's value (missing fields are None),
    e.g. ``qemu_encoding=lambda v: v and v.startswith('mapped-ram')``.  For dict fields with
    a ``name`` (``libvirt_format``) a string matches the name: ``libvirt_format='sparse'``.
    Sorted by decompressed_path.
    """
    kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
    out = []
    for e in MANIFEST:
        if kinds is not None and e.get("kind") not in kinds:
            continue
        if all(_matches(e.get(k), v) for k, v in filters.items()):
            out.append(e)
    return sorted(out, key=lambda e: e["decompressed_path"])


def is_archived(e: Mapping[str, Any]) -> bool:
    """True for files stored inside an archive (images and dumps), False for plain text."""
    return bool(e.get("archive"))


# --------------------------------------------------------------------------- extraction

def _archives() -> list[str]:
    return sorted({e["archive"] for e in MANIFEST if is_archived(e)})


_ARCHIVE_KEY: str | None = None


def archive_key() -> str:
    """First 16 hex digits of the sha256 of the archive file(s) (concatenated, sorted by name)."""
    global _ARCHIVE_KEY
    if _ARCHIVE_KEY is None:
        h = hashlib.sha256()
        for name in _archives():
            p = DATA_DIR / name
            if not p.is_file():
                raise FixtureError(f"{p} is missing; run scripts/pack-fixtures.py")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
        _ARCHIVE_KEY = h.hexdigest()[:16]
    return _ARCHIVE_KEY


def cache_root() -> Path:
    env = os.environ.get("RAMFS_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ramfs-tests"


def _write_sparse(src, dst: Path, size: int) -> str:
    """Copy ``size`` bytes from ``src`` to a new file, leaving 4 KiB zero pages as holes.

    Returns the sha256 of everything read.
    """
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb", buffering=0) as out:
        pos = 0
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n = len(chunk)
            if chunk != (_ZERO_CHUNK if n == _CHUNK else bytes(n)):
                # Write runs of non-zero pages; skip zero pages.
                run = -1
                for off in range(0, n, _PAGE):
                    zero = chunk[off:off + _PAGE] == _ZERO_PAGE[: min(_PAGE, n - off)]
                    if not zero and run < 0:
                        run = off
                    elif zero and run >= 0:
                        out.seek(pos + run)
                        out.write(chunk[run:off])
                        run = -1
                if run >= 0:
                    out.seek(pos + run)
                    out.write(chunk[run:])
            pos += n
        if pos != size:
            raise FixtureError(f"{dst.name}: archive member has {pos} bytes, header says {size}")
        out.truncate(pos)
    return h.hexdigest()


def extract_archives(dest: str | os.PathLike[str],
                     manifest: Iterable[Mapping[str, Any]] | None = None) -> dict[str, str]:
    """Extract every archived file into ``dest`` (an existing, empty directory), checking each
    one's size and sha256 against ``manifest`` (default: MANIFEST).

    Returns ``{decompressed_path: sha256}`` as computed while extracting.  Raises FixtureError
    on any mismatch, on an unexpected or missing member, or on a non-regular member.
    Used by fixture_path() (into a temporary directory) and by scripts/pack-fixtures.py.
    """
    dest = Path(dest)
    want = {e["decompressed_path"]: e for e in (MANIFEST if manifest is None else manifest)
            if is_archived(e)}
    got: dict[str, str] = {}
    for name in sorted({e["archive"] for e in want.values()}):
        with lzma.open(DATA_DIR / name, "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            for m in tar:
                if m.isdir():
                    continue
                e = want.get(m.name)
                if e is None or e["archive"] != name:
                    raise FixtureError(f"{name}: unexpected member {m.name!r}")
                if not m.isreg():
                    raise FixtureError(f"{name}: member {m.name!r} is not a regular file")
                if m.name in got:
                    raise FixtureError(f"{name}: member {m.name!r} appears twice")
                if m.size != e["logical_size"]:
                    raise FixtureError(f"{m.name}: size {m.size}, manifest says {e['logical_size']}")
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                digest = _write_sparse(src, target, m.size)
                if digest != e["sha256"]:
                    raise FixtureError(f"{m.name}: sha256 {digest}, manifest says {e['sha256']}")
                os.chmod(target, 0o444)
                got[m.name] = digest
    missing = sorted(set(want) - set(got))
    if missing:
        raise FixtureError(f"not in the archive(s): {missing}")
    return got


def _cache_ok(d: Path) -> bool:
    """Cheap check of an existing cache dir: stamp present, every file there with its size."""
    if not (d / STAMP).is_file():
        return False
    for e in MANIFEST:
        if is_archived(e):
            try:
                if (d / e["decompressed_path"]).stat().st_size != e["logical_size"]:
                    return False
            except OSError:
                return False
    return True


def _rmtree(p: Path) -> None:
    # Files are read-only; directories are not, so rmtree works (also as non-root).
    shutil.rmtree(p, ignore_errors=True)


_CACHE_DIR: Path | None = None


def cache_dir() -> Path:
    """The verified extraction directory, extracting it first if needed."""
    global _CACHE_DIR
    if _CACHE_DIR is not None:
        return _CACHE_DIR
    root = cache_root()
    key = archive_key()
    final = root / f"fixtures-{key}"
    if _cache_ok(final):
        _CACHE_DIR = final
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"fixtures-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_ok(final):  # another process may have finished meanwhile
            # Leftovers from killed extractions, or a damaged cache dir: we hold the lock.
            for old in root.glob(f".tmp-fixtures-{key}-*"):
                _rmtree(old)
            if final.exists():
                broken = Path(tempfile.mkdtemp(prefix=f".tmp-fixtures-{key}-", dir=root))
                os.rename(final, broken / "old")
                _rmtree(broken)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-fixtures-{key}-", dir=root))
            try:
                got = extract_archives(tmp)
                with open(tmp / STAMP, "w", encoding="utf-8") as f:
                    json.dump(got, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o755)
                os.rename(tmp, final)
            except BaseException:
                _rmtree(tmp)
                raise
    _CACHE_DIR = final
    return final


def fixture_path(decompressed_path: str | os.PathLike[str]) -> Path:
    """Path of a shipped file, by its manifest ``decompressed_path``.

    Images and ground-truth dumps come from the verified extraction cache (extracting it on
    first use); text files (xml/txt) are served from tests/data directly.  Do not modify them.
    """
    e = entry(decompressed_path)
    if is_archived(e):
        return cache_dir() / e["decompressed_path"]
    p = DATA_DIR / e["decompressed_path"]
    if not p.is_file():
        raise FixtureError(f"{p} is missing; run scripts/pack-fixtures.py")
    return p
