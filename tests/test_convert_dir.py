"""Converting by copying: ``cp IMAGE MOUNTPOINT/convert/`` through a real FUSE mount."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import sparse_copy
from fixture_data import MANIFEST, fixture_path
from mountutil import mounted
from ramfs.convert import convert_file
from ramfs.image import open_image

SEQUENTIAL = [e["decompressed_path"] for e in MANIFEST
              if e["kind"] == "image" and e["qemu_encoding"] == "sequential"]


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def no_temporaries(backing: Path) -> bool:
    return not [p for p in os.listdir(backing) if p.startswith(".ramfs-convert")]


@pytest.fixture
def backing(tmp_path):
    d = tmp_path / "saves"
    d.mkdir()
    return d


def test_cp_of_every_sequential_fixture_equals_the_cli_conversion(backing, tmp_path):
    """Same bytes as ``ramfs convert`` (whose output real QEMU restores: test_convert.py)."""
    mp = tmp_path / "mp"
    with mounted(backing, mp):
        for i, name in enumerate(SEQUENTIAL):
            src = fixture_path(name)
            before = sha(src)
            dst = f"{i}-{Path(name).name}"
            r = subprocess.run(["cp", str(src), str(mp / "convert" / dst)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert sha(src) == before  # the source is never modified
            cli = tmp_path / f"cli-{dst}"
            convert_file(str(src), str(cli))
            assert sha(backing / dst) == sha(cli), name
            # It shows up as an image of the mount, and in convert/ with the converted bytes.
            assert (mp / dst / "ram" / "pc.ram").stat().st_size > 0
            assert sha(mp / "convert" / dst) == sha(cli)
            with open_image(backing / dst) as out, open_image(src) as orig:
                assert out.encoding == "mapped-ram"
                for a, b in zip(out.blocks, orig.blocks):
                    assert out.read(a, 0, a.used_length) == orig.read(b, 0, b.used_length)
        status = (mp / "convert" / "STATUS").read_text()
        assert status.count("\tdone\t") == len(SEQUENTIAL)
    assert no_temporaries(backing)


def test_sparse_image_is_stored_as_is(backing, tmp_path):
    mp = tmp_path / "mp"
    src = fixture_path("libvirt/fw-pc-sparse.img")
    with mounted(backing, mp):
        r = subprocess.run(["cp", "--sparse=always", str(src), str(mp / "convert" / "s.save")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert sha(backing / "s.save") == sha(src)
    assert (backing / "s.save").stat().st_blocks * 512 < 8 << 20  # holes kept


def test_out_of_order_writes_and_gaps(backing, tmp_path):
    """Chunks written in shuffled order (and the zero padding never written) still convert."""
    mp = tmp_path / "mp"
    src = fixture_path("libvirt/fw-pc-raw.img")
    data = src.read_bytes()
    with mounted(backing, mp):
        fd = os.open(mp / "convert" / "shuffled.save", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            chunks = [(o, data[o:o + 65536]) for o in range(0, len(data), 65536)]
            rng = random.Random(4)
            head, rest = chunks[:4], chunks[4:]
            for k in range(0, len(rest) - 8, 8):  # local shuffles, like reordered writeback
                window = rest[k:k + 8]
                rng.shuffle(window)
                rest[k:k + 8] = window
            for off, chunk in rest + head:
                if chunk.count(0) == len(chunk):
                    continue  # a hole: never written, must read as zeros
                os.pwrite(fd, chunk, off)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    cli = tmp_path / "cli.save"
    convert_file(str(src), str(cli))
    assert sha(backing / "shuffled.save") == sha(cli)


@pytest.mark.parametrize("garbage", [b"", b"hello" * 1000, os.urandom(1 << 20)], ids=["empty", "text", "random"])
def test_garbage_fails_cp_with_einval(backing, tmp_path, garbage):
    mp = tmp_path / "mp"
    src = tmp_path / "garbage.bin"
    src.write_bytes(garbage)
    with mounted(backing, mp):
        r = subprocess.run(["cp", str(src), str(mp / "convert" / "g.save")], capture_output=True, text=True)
        # The empty file too: its close is the last one (the copier holds no other
        # descriptor on it), so the failure reaches cp.
        assert r.returncode != 0
        assert "Invalid argument" in r.stderr
        assert "\tfailed\t" in (mp / "convert" / "STATUS").read_text()
        assert not (mp / "convert" / "g.save").exists()
        assert "g.save" not in os.listdir(mp)
    assert os.listdir(backing) == []


def test_empty_input_through_a_dup_still_fails(backing, tmp_path):
    """dd and the shell's "> file" close a dup()ed descriptor before writing: that close is
    not the end. An empty input still fails at the last close; a real one converts."""
    mp = tmp_path / "mp"
    src = fixture_path("firmware/q35-sequential.img")
    with mounted(backing, mp):
        r = subprocess.run(["dd", f"of={mp / 'convert' / 'e.save'}", "status=none"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
        with open(src, "rb") as f:
            r = subprocess.run(["sh", "-c", f"sleep 0.3; dd of={mp / 'convert' / 'd.save'} bs=1M status=none"],
                               stdin=f, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["sh", "-c", f"cat {src} > {mp / 'convert' / 's.save'}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(backing)) == ["d.save", "s.save"]
    assert sha(backing / "d.save") == sha(backing / "s.save")


def test_truncated_image_fails_and_leaves_nothing(backing, tmp_path):
    mp = tmp_path / "mp"
    src = tmp_path / "cut.save"
    data = fixture_path("firmware/q35-sequential.img").read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with mounted(backing, mp):
        r = subprocess.run(["cp", str(src), str(mp / "convert" / "cut.save")], capture_output=True, text=True)
        assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert os.listdir(backing) == []


def test_existing_name_is_never_overwritten(backing, tmp_path):
    mp = tmp_path / "mp"
    (backing / "taken.save").write_bytes(b"precious")
    with mounted(backing, mp):
        r = subprocess.run(["cp", str(fixture_path("firmware/pc-sequential.img")), str(mp / "convert" / "taken.save")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "File exists" in r.stderr
        r = subprocess.run(["cp", str(fixture_path("firmware/pc-sequential.img")), str(mp / "convert" / "new.save")],
                           capture_output=True, text=True)
        assert r.returncode == 0
        r = subprocess.run(["cp", str(fixture_path("firmware/q35-sequential.img")), str(mp / "convert" / "new.save")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "File exists" in r.stderr
    assert (backing / "taken.save").read_bytes() == b"precious"
    with open_image(backing / "new.save") as img:
        assert img.layout.machine == "pc-i440fx-10.0"
    assert no_temporaries(backing)


def test_cp_killed_half_way_leaves_nothing(backing, tmp_path):
    """SIGKILL during the copy: the kernel still flushes; the conversion fails and is removed."""
    mp = tmp_path / "mp"
    big = fixture_path("libvirt/fw-pc-raw.img")
    with mounted(backing, mp):
        # A writer that stops half way and is then killed (its whole process group).
        p = subprocess.Popen(["sh", "-c", f"(head -c 600000 {big}; sleep 30) > {mp}/convert/killed.save"],
                             start_new_session=True)
        deadline = time.monotonic() + 20
        while "killed.save" not in os.listdir(mp / "convert"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 20
        while "killed.save" in os.listdir(mp / "convert"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "killed.save" not in os.listdir(mp)
    assert os.listdir(backing) == []


def test_enospc_in_the_backing_directory(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        mp = tmp_path / "mp"
        with mounted(small, mp):
            r = subprocess.run(["cp", str(fixture_path("libvirt/fw-pc-raw.img")), str(mp / "convert" / "x.save")],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_convert_dir_permissions_and_readonly_rest(backing, tmp_path):
    mp = tmp_path / "mp"
    sparse_copy(fixture_path("firmware/pc-mapped-ram.img"), backing / "a.save")
    with mounted(backing, mp):
        st = (mp / "convert").stat()
        assert st.st_mode & 0o777 == 0o755 and st.st_uid == os.getuid()
        for bad in (mp / "new.txt", mp / "a.save" / "x", mp / "a.save" / "ram" / "y"):
            with pytest.raises(OSError):
                bad.write_bytes(b"x")
        with pytest.raises(OSError):
            os.mkdir(mp / "convert" / "d")
        with pytest.raises(OSError):
            open(mp / "a.save" / "ram" / "pc.ram", "r+b")


@pytest.mark.qemu
def test_cp_of_the_linux_guest_equals_the_cli_conversion(backing, tmp_path):
    """A Linux guest made at test time (qemu_images.build_linux), its libvirt raw image and its
    bare sequential stream through cp: the same bytes as ramfs convert, and QEMU restores
    them to the guest's memory."""
    import qemu_images
    lv = qemu_images.build_linux_libvirt()
    mp = tmp_path / "mp"
    with mounted(backing, mp):
        for src, dst in ((lv.raw, "linux-q35-raw.img"), (lv.guest.sequential, "linux-q35-sequential.img")):
            r = subprocess.run(["cp", str(src), str(mp / "convert" / dst)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            cli = tmp_path / f"cli-{dst}"
            convert_file(str(src), str(cli))
            assert sha(backing / dst) == sha(cli), dst
    dump = tmp_path / "pmemsave.bin"
    for dst, libvirt in (("linux-q35-raw.img", True), ("linux-q35-sequential.img", False)):
        with open(backing / dst, "rb") as f:
            head = f.read(92)
        offset = 0
        if libvirt:  # a libvirt sparse image (format 6): the stream after header and XML
            assert head[:16] == b"LibvirtQemudSave" and struct.unpack_from("<I", head, 28)[0] == 6
            offset = 92 + struct.unpack_from("<I", head, 20)[0]
        qemu_images.restore_and_dump(backing / dst, lv.guest.machine_args(), capabilities=("mapped-ram",),
                                     offset=offset, out_path=dump)
        assert qemu_images.first_difference(dump, lv.pmemsave) is None, dst
        dump.unlink()


def _as_nobody(*cmd: str, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          stdin=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "allow-other"])
def test_other_users_and_convert_dir(backing, tmp_path, shared):
    """Another user (nobody) sees nothing of a private mount. With --allow-other, convert/
    mirrors the backing directory: nobody cannot copy into root's 0755 directory (EACCES,
    nothing left), and once the directory is theirs, their copy converts and is theirs,
    while the rest of the tree stays read-only for them."""
    import shutil
    import tempfile
    sparse_copy(fixture_path("firmware/pc-mapped-ram.img"), backing / "a.save")
    backing.chmod(0o755)
    # The mountpoint must be reachable by nobody: pytest's tmp_path is root-only.
    top = Path(tempfile.mkdtemp(prefix="ramfs-perm-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        mp = top / "mp"
        src = top / "src.save"
        shutil.copy(fixture_path(SEQUENTIAL[0]), src)
        src.chmod(0o644)
        extra = ("--allow-other",) if shared else ()
        with mounted(backing, mp, *extra):
            ls = _as_nobody("ls", str(mp / "convert"))
            st = (mp / "convert").stat()
            assert st.st_mode & 0o7777 == 0o755 and st.st_uid == 0
            if not shared:
                assert ls.returncode != 0 and "denied" in ls.stderr.lower()
                return
            assert ls.returncode == 0, ls.stderr
            r = _as_nobody("cp", str(src), str(mp / "convert" / "b.save"))
            assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
            assert sorted(os.listdir(backing)) == ["a.save"]
            os.chown(backing, 65534, 65534)
            deadline = time.monotonic() + 5
            while (mp / "convert").stat().st_uid != 65534:
                assert time.monotonic() < deadline, "the new owner of the directory never showed"
                time.sleep(0.2)
            with open(src, "rb") as f:
                r = _as_nobody("sh", "-c", f"umask 027; dd of={mp / 'convert' / 'b.save'} bs=1M", stdin=f)
            assert r.returncode == 0, r.stderr
            st = os.stat(backing / "b.save")
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
            assert _as_nobody("touch", str(mp / "x")).returncode != 0
            assert _as_nobody("sh", "-c", f": > {mp / 'a.save' / 'image.json'}").returncode != 0
        with open_image(backing / "b.save") as out, open_image(src) as orig:
            assert out.encoding == "mapped-ram"
            for blk in orig.blocks:
                assert out.read(blk.idstr, 0, blk.used_length) == orig.read(blk, 0, blk.used_length)
    finally:
        shutil.rmtree(top, ignore_errors=True)
