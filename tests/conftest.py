"""Shared test helpers: real fixture images, mutation of copies, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own ramfs cache; tests never touch the user's."""
    d = tmp_path_factory.getbasetemp() / "ramfs-cache"
    monkeypatch.setenv("RAMFS_CACHE_DIR", str(d))
    return d


def sparse_copy(src: Path, dst: Path) -> Path:
    """Copy keeping holes, so a 70 MiB sparse mapped-ram image costs a few MiB."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            fi.seek(data)
            fo.seek(data)
            left = hole - data
            while left:
                chunk = fi.read(min(left, 1 << 20))
                fo.write(chunk)
                left -= len(chunk)
            pos = hole
        fo.truncate(size)
    return dst


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def mutable(tmp_path):
    """``mutable(fixture_path)`` -> a private copy to damage."""
    def make(src: Path, name: str | None = None) -> Path:
        return sparse_copy(Path(src), tmp_path / (name or Path(src).name))
    return make

