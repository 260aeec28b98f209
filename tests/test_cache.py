"""The sequential index and the decompression cache: built once, reused, never trusted blindly."""

from __future__ import annotations

import hashlib
import os

from fixture_data import fixture_path
from ramfs.image import open_image
from ramfs.image.cache import CachePolicy


def digest(img):
    blk = img.block("pc.ram")
    return hashlib.sha256(img.read(blk, 0, blk.used_length)).hexdigest()


def test_index_is_cached_and_reused(mutable, tmp_path):
    img = mutable(fixture_path("firmware/pc-sequential.img"))
    cache = tmp_path / "cache"
    with open_image(img, cache=cache) as a:
        assert not a.index_from_cache
        want = digest(a)
    assert list((cache / "index").glob("*.idx"))
    with open_image(img, cache=cache) as b:
        assert b.index_from_cache and digest(b) == want


def test_changed_image_gets_a_new_index(mutable, tmp_path):
    img = mutable(fixture_path("firmware/pc-sequential.img"))
    cache = tmp_path / "cache"
    open_image(img, cache=cache).close()
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with open_image(img, cache=cache) as again:
        assert not again.index_from_cache


def test_corrupt_index_is_ignored_with_a_warning(mutable, tmp_path):
    img = mutable(fixture_path("firmware/pc-sequential.img"))
    cache = tmp_path / "cache"
    with open_image(img, cache=cache) as a:
        want = digest(a)
    idx = next((cache / "index").glob("*.idx"))
    data = bytearray(idx.read_bytes())
    # Point every stored page offset far outside the image.
    data[-8:] = (1 << 62).to_bytes(8, "little")
    idx.write_bytes(bytes(data))
    with open_image(img, cache=cache) as b:
        assert not b.index_from_cache
        assert any("ignored cached index" in w for w in b.warnings)
        assert digest(b) == want
    idx.write_bytes(b"RAMFSIDX garbage")
    with open_image(img, cache=cache) as c:
        assert digest(c) == want


def test_compressed_image_decompressed_once_into_a_sparse_cache(mutable, tmp_path):
    img = mutable(fixture_path("libvirt/fw-pc-xz.img"))
    cache = CachePolicy(tmp_path / "cache", keep=True)
    with open_image(img, cache=cache) as a:
        assert not a.index_from_cache
        want = digest(a)
    spool = next((cache.root / "data").glob("*.stream"))
    # The spool holds the decompressed stream; QEMU sends zero pages as 9-byte records,
    # so it is about the size of a raw image, far from the 64 MiB of RAM.
    assert spool.stat().st_size < 4 << 20
    with open_image(img, cache=cache) as b:
        assert b.index_from_cache and digest(b) == want
    assert not list((cache.root / "data").glob(".*tmp*"))


def test_decompressed_stream_is_removed_at_close_unless_kept(mutable, tmp_path):
    """A copy of guest memory does not outlive its use unless someone asked to keep it."""
    img = mutable(fixture_path("libvirt/fw-pc-gzip.img"))
    cache = tmp_path / "cache"
    with open_image(img, cache=cache) as a:
        want = digest(a)
        assert [p.suffix for p in sorted((cache / "data").iterdir())] == [".idx", ".json", ".stream"]
        # A second reader of the same entry keeps it alive past the first one's close.
        with open_image(img, cache=cache) as b:
            assert b.index_from_cache
        assert list((cache / "data").glob("*.stream"))
        assert digest(a) == want
    assert list((cache / "data").iterdir()) == []
    with open_image(img, cache=CachePolicy(cache, keep=True)) as c:
        assert digest(c) == want
    with open_image(img, cache=cache) as d:  # kept entries stay kept
        assert d.index_from_cache
    assert list((cache / "data").glob("*.stream"))


def test_no_cache_reads_a_compressed_image_without_writing_anything(mutable, tmp_path, monkeypatch):
    img = mutable(fixture_path("libvirt/fw-pc-zstd.img"))
    cache = tmp_path / "cache"
    cache.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    with open_image(img, cache=CachePolicy(cache, enabled=False)) as a:
        want = digest(a)
        assert list(tmp.iterdir()) == []  # an unnamed file
    assert list(cache.iterdir()) == []
    with open_image(img, cache=CachePolicy(cache, keep=True)) as b:
        assert digest(b) == want
    assert list(tmp.iterdir()) == []


def test_info_only_open_of_compressed_image_writes_no_spool(mutable, tmp_path):
    img = mutable(fixture_path("libvirt/fw-pc-bzip2.img"))
    cache = tmp_path / "cache"
    with open_image(img, cache=cache, reads=False) as a:
        assert a.block("pc.ram").populated_pages > 300
        assert a.layout.vmdesc is not None
    assert not (cache / "data").exists() or not list((cache / "data").iterdir())
