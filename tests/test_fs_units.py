"""The FUSE layer without a mount: name escaping, the tree, errno mapping, operations."""

from __future__ import annotations

import errno
import os
import random

import pyfuse3
import pytest
import trio

from fixture_data import fixture_path
from ramfs.errors import FormatError, ImageIOError, TruncatedError
from ramfs.fs.names import NAME_MAX, escape, unescape
from ramfs.fs.ops import Operations, errno_for
from ramfs.fs.tree import ROOT_INODE, Tree


@pytest.mark.parametrize("idstr,want", [
    ("pc.ram", [b"pc.ram"]),
    ("/rom@etc/acpi/tables", [b"rom@etc", b"acpi", b"tables"]),
    ("0000:00:02.0/vga.vram", [b"0000:00:02.0", b"vga.vram"]),
    ("a/../b", [b"a", b"%2E%2E", b"b"]),
    (".", [b"%2E"]),
    ("x//y/", [b"x", b"%", b"y", b"%"]),
    ("50%", [b"50%25"]),
])
def test_escape_examples(idstr, want):
    comps, _ = escape(idstr)
    assert comps == want


def test_escape_is_reversible_and_safe():
    rng = random.Random(5)
    alphabet = ["a", "/", ".", "%", "\0", "é", "2", "E", "+", ":"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 256)))
        comps, lead = escape(s)
        assert unescape(comps, lead) == s
        for c in comps:
            assert 0 < len(c) <= NAME_MAX and b"/" not in c and b"\0" not in c
            assert c not in (b".", b"..")


def test_escape_long_components():
    s = "%" * 255
    comps, lead = escape(s)
    assert len(comps) == 4 and all(len(c) <= NAME_MAX for c in comps)
    assert unescape(comps, lead) == s


def test_errno_mapping():
    assert errno_for(FormatError("x")) == errno.EIO
    assert errno_for(TruncatedError("x", 5)) == errno.EIO
    assert errno_for(ImageIOError("x", errno.ENOSPC)) == errno.ENOSPC
    assert errno_for(OSError(errno.EACCES, "x")) == errno.EACCES
    assert errno_for(pyfuse3.FUSEError(errno.ENOENT)) == errno.ENOENT
    assert errno_for(ValueError()) == errno.EIO


def tree_for(name):
    t = Tree()
    t.mount_image(str(fixture_path(name)))
    return t


def path_inode(tree, *names):
    node = tree.root
    for n in names:
        node = node.children[n]
    return node


def test_tree_layout_for_a_libvirt_image():
    t = tree_for("libvirt/fw-pc-sparse.img")
    try:
        assert sorted(t.root.children) == [b"cookie.xml", b"cpus.json", b"devices.json", b"domain.xml", b"export",
                                           b"image.json", b"maps", b"phys", b"ram"]
        tables = path_inode(t, b"ram", b"rom@etc", b"acpi", b"tables")
        assert tables.size == 0x20000 and tables.blocks == 3 * 4096 // 512
        m = path_inode(t, b"maps", b"pc.ram").data.decode().splitlines()  # a StaticFile
        img = t.images[0]
        assert [tuple(map(int, ln.split())) for ln in m] == list(img.block("pc.ram").populated_ranges())
    finally:
        t.close()


def call(coro_fn, *args):
    return trio.run(coro_fn, *args)


def test_operations_errnos():
    t = tree_for("firmware/pc-mapped-ram.img")
    ops = Operations(t)
    try:
        ram = call(ops.lookup, ROOT_INODE, b"ram", None)
        pc = call(ops.lookup, ram.st_ino, b"pc.ram", None)
        assert pc.st_size == 64 << 20 and pc.st_blksize == 1 << 20 and pc.st_mode & 0o777 == 0o444
        for name in (b"nope", b"..x"):
            with pytest.raises(pyfuse3.FUSEError) as e:
                call(ops.lookup, ROOT_INODE, name, None)
            assert e.value.errno == errno.ENOENT
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as e:
                call(ops.open, pc.st_ino, flags, None)
            assert e.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as e:
            call(ops.open, ram.st_ino, os.O_RDONLY, None)
        assert e.value.errno == errno.EISDIR
        with pytest.raises(pyfuse3.FUSEError) as e:
            call(ops.getattr, 99999, None)
        assert e.value.errno == errno.ENOENT
        fi = call(ops.open, pc.st_ino, os.O_RDONLY, None)
        data = call(ops.read, fi.fh, 0x2000000, 21)
        assert bytes(data) == b"RAMFS-FIXTURE-MARKER-"
        assert call(ops.read, fi.fh, 64 << 20, 10) == b""
    finally:
        t.close()


def test_a_bug_in_a_handler_becomes_eio_not_a_crash(caplog):
    t = tree_for("firmware/pc-mapped-ram.img")
    ops = Operations(t)
    try:
        node = path_inode(t, b"ram", b"pc.ram")

        class Broken:
            size = node.size

            def read(self, off, size, nowait=False):
                raise ZeroDivisionError("boom")

            def has_data(self, off, size):
                return True
        node.view = Broken()
        fi = call(ops.open, node.inode, os.O_RDONLY, None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            call(ops.read, fi.fh, 0, 10)
        assert e.value.errno == errno.EIO
        assert "bug in read" in caplog.text
    finally:
        t.close()


@pytest.mark.parametrize("seed", range(6))
def test_assembler_tail_matches_a_bytearray_model(seed, monkeypatch, tmp_path):
    """convert/ recognises a complete image by the last bytes written; the chunked tail
    keeps exactly what the simple bytearray version kept (at least TAIL_KEEP bytes)."""
    from ramfs.fs import convertdir
    monkeypatch.setattr(convertdir, "TAIL_KEEP", 1000)
    rng = random.Random(seed)
    asm = convertdir.Assembler(os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    model, model_end = bytearray(), 0
    pos = 0
    for _ in range(300):
        offset = max(0, pos + rng.randrange(-600, 400))
        data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 50, 300, 1500])))
        asm._keep_tail(offset, data)
        end = offset + len(data)
        if end >= model_end:  # the former implementation, as the model
            if offset <= model_end and model_end - offset <= len(model):
                del model[len(model) - (model_end - offset):]
                model += data
            else:
                model = bytearray(data)
            model_end = end
            model = model[-1000:]
        pos = max(pos, end)
        got = b"".join(asm._tail)
        assert asm._tail_end == model_end and asm._tail_len == len(got) >= len(model)
        assert got[-1000:] == bytes(model)
    asm.close()


def test_nowait_reads_only_from_the_page_cache():
    """FileSource.readinto_at(nowait=True) (the FUSE loop's fast path) never waits for the
    disk: an evicted range raises WouldBlock, a cached one reads the same bytes."""
    import tempfile

    from ramfs.image.files import FileSource, WouldBlock
    # /var/tmp, not /tmp: tmpfs pages cannot be evicted, and this test evicts them.
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        data = os.urandom(8 << 20)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        src = FileSource(f.name)
        try:
            buf = bytearray(65536)
            # RWF_NOWAIT starts readahead before it refuses, and a fast (virtual) disk can
            # finish it before the kernel looks again: then the read succeeds. A refusal
            # must come within a few tries, each at a range never read.
            refused = False
            for i in range(8):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                try:
                    src.readinto_at(memoryview(buf), (i << 20) + 4096, nowait=True)
                except WouldBlock:
                    refused = True
                    break
            assert refused
            src.readinto_at(memoryview(buf), 4096)  # now cached
            again = bytearray(65536)
            src.readinto_at(memoryview(again), 4096, nowait=True)
            assert again == buf == data[4096:4096 + 65536]
        finally:
            src.close()


@pytest.mark.parametrize("seed", range(6))
def test_assembler_spooled_ranges_match_a_set_model(seed, tmp_path):
    """Writes ahead of the stream are spooled; the ranges kept are those of the bytes
    written, merged where they overlap or touch, and they read back as written."""
    from ramfs.fs import convertdir
    rng = random.Random(seed)
    asm = convertdir.Assembler(os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    written: dict[int, int] = {}
    for _ in range(rng.choice([1, 10, 200])):
        offset = rng.randrange(1, 3000)
        data = bytes(rng.randrange(1, 256) for _ in range(rng.choice([1, 2, 17, 100])))
        asm.write(offset, data)
        written.update((offset + k, b) for k, b in enumerate(data))
        want, cur = [], None
        for p in sorted(written):
            if cur is not None and cur[1] == p:
                cur = (cur[0], p + 1)
            else:
                if cur is not None:
                    want.append(cur)
                cur = (p, p + 1)
        want.append(cur)
        assert asm._ahead == want
    asm.write(0, b"\0")  # the stream starts: everything up to the first gap follows it
    asm.close_input()
    got = b""
    while chunk := asm.read(1000):
        got += chunk
    assert got == bytes(written.get(p, 0) for p in range(len(got))) and len(got) == max(written) + 1
    asm.close()
