"""A mount never shows anyone more than the source files allow (docs/security.md).

Every test here mounts for real, as root with ``allow_other`` (what the README's fstab line
does), and looks through the mount as an unprivileged user (``setpriv`` to nobody), as an
attacker on a hypervisor host would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fixture_data import fixture_path
from mountutil import mounted, ramfs_cmd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: allow_other mounts and setpriv")

NOBODY = 65534
# What a root-only save holds that others must not read, and where each view lives.
VIEWS = ["ram/pc.ram", "phys/memory", "phys/core.elf", "export/sequential.img", "domain.xml", "image.json",
         "maps/pc.ram", "cpus.json"]


def as_user(uid: int, *cmd: str, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
                          stdin=stdin, capture_output=True, text=True, timeout=120)


def read_as(uid: int, paths: list[Path]) -> dict[str, str]:
    """Each path read by ``uid`` (its first byte): "ok", or the error head(1) gave."""
    script = 'for p in "$@"; do if err=$(head -c 1 -- "$p" 2>&1 >/dev/null); then echo "$p|ok"; ' \
             'else echo "$p|${err##*: }"; fi; done'
    r = as_user(uid, "sh", "-c", script, "sh", *map(str, paths))
    assert r.returncode == 0, r.stderr
    return dict(line.split("|", 1) for line in r.stdout.splitlines())


@pytest.fixture
def top():
    """A directory nobody can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="ramfs-sec-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _image(path: Path, mode: int, fixture: str = "libvirt/fw-pc-raw.img") -> Path:
    shutil.copy(fixture_path(fixture), path)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("user", [None, "nobody"], ids=["root", "user-nobody"])
@pytest.mark.parametrize("layout", ["single", "directory"])
def test_views_of_a_root_only_image_are_root_only(top, layout, user):
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    secret = _image(saves / "secret.save", 0o600)
    public = _image(saves / "public.save", 0o644)
    extra = ["--allow-other"] + (["--user", user] if user else [])
    roots = {}
    with contextlib.ExitStack() as stack:
        if layout == "single":
            for img in (secret, public):
                mp = top / f"mp-{img.stem}"
                stack.enter_context(mounted(img, mp, *extra))
                roots[img.name] = mp
        else:
            mp = top / "mp"
            stack.enter_context(mounted(saves, mp, *extra))
            roots = {img.name: mp / img.name for img in (secret, public)}
        got = read_as(NOBODY, [roots[n] / v for n in roots for v in VIEWS])
        for name, root in roots.items():
            for v in VIEWS:
                want = "Permission denied" if name == "secret.save" else "ok"
                assert got[str(root / v)] == want, (name, v, got[str(root / v)])
            st = (root / "ram" / "pc.ram").stat()
            src = (saves / name).stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (src.st_uid, src.st_gid, src.st_mode & 0o444)
            d = root.stat()
            assert d.st_mode & 0o777 == {0o600: 0o500, 0o644: 0o555}[src.st_mode & 0o777]
        # Root reads everything, as it could read the files themselves.
        assert set(read_as(0, [roots["secret.save"] / v for v in VIEWS]).values()) == {"ok"}


@pytest.mark.parametrize("layout", ["single", "directory"])
def test_a_changed_mode_shows_within_the_refresh_time(top, layout):
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    img = _image(saves / "vm.save", 0o644)
    mp = top / "mp"
    with mounted(img if layout == "single" else saves, mp, "--allow-other"):
        root = mp if layout == "single" else mp / "vm.save"
        target = root / "domain.xml"
        # A process sitting inside the image's tree: it never looks the root up again.
        assert read_as(NOBODY, [target])[str(target)] == "ok"
        for mode, want in ((0o600, "Permission denied"), (0o644, "ok"), (0o640, "Permission denied")):
            img.chmod(mode)
            deadline = time.monotonic() + 5
            while read_as(NOBODY, [target])[str(target)] != want:
                assert time.monotonic() < deadline, f"mode {mode:o} not shown after 5 s"
                time.sleep(0.2)
            # The directory above may have refreshed (and refused) first: the file's own mode
            # follows within the same refresh time.
            while target.stat().st_mode & 0o777 != mode & 0o444:
                assert time.monotonic() < deadline, f"mode {mode:o} not in stat after 5 s"
                time.sleep(0.2)


def test_error_files_follow_the_image(top):
    """A damaged image's ERROR names and describes it: it is as private as the image."""
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    data = fixture_path("libvirt/fw-pc-raw.img").read_bytes()
    for name, mode in (("bad-private.save", 0o600), ("bad-public.save", 0o644)):
        (saves / name).write_bytes(data[:5000])
        (saves / name).chmod(mode)
    mp = top / "mp"
    with mounted(saves, mp, "--allow-other"):
        got = read_as(NOBODY, [mp / "bad-private.save" / "ERROR", mp / "bad-public.save" / "ERROR"])
        assert got == {str(mp / "bad-private.save" / "ERROR"): "Permission denied",
                       str(mp / "bad-public.save" / "ERROR"): "ok"}


def test_the_root_of_a_directory_mount_mirrors_the_directory(top):
    saves = top / "saves"
    saves.mkdir(mode=0o750)
    _image(saves / "vm.save", 0o644)
    mp = top / "mp"
    with mounted(saves, mp, "--allow-other"):
        st = mp.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o550)
        r = as_user(NOBODY, "ls", str(mp))
        assert r.returncode != 0 and "Permission denied" in r.stderr
        got = read_as(NOBODY, [mp / "vm.save" / "domain.xml"])
        assert list(got.values()) == ["Permission denied"]


def test_cp_into_convert_needs_the_right_to_write_the_directory(top):
    """As if the caller wrote into the backing directory: root's 0755 directory refuses
    nobody (EACCES, nothing left behind); nobody's own directory takes their copy, which is
    theirs, with their umask, and which another user then cannot read."""
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    src = _image(top / "src.save", 0o644)
    mp = top / "mp"
    with mounted(saves, mp, "--allow-other"):
        r = as_user(NOBODY, "cp", str(src), str(mp / "convert" / "a.save"))
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        assert os.listdir(saves) == []
        assert "a.save" not in (mp / "convert" / "STATUS").read_text()
    os.chown(saves, NOBODY, NOBODY)
    with mounted(saves, mp, "--allow-other"):
        r = as_user(NOBODY, "sh", "-c", f"umask 077; cp {src} {mp / 'convert' / 'a.save'}")
        assert r.returncode == 0, r.stderr
        st = (saves / "a.save").stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)
        # The converted image is private to nobody through the mount too.
        got = read_as(NOBODY + 1, [mp / "a.save" / "ram" / "pc.ram"])
        assert list(got.values()) == ["Permission denied"]
        assert list(read_as(NOBODY, [mp / "a.save" / "ram" / "pc.ram"]).values()) == ["ok"]
        # Another user may not write into nobody's 0755 directory either.
        r = as_user(NOBODY + 1, "cp", str(src), str(mp / "convert" / "b.save"))
        assert r.returncode != 0 and "Permission denied" in r.stderr
    assert sorted(os.listdir(saves)) == ["a.save"]


def test_convert_of_a_user_mount_takes_copies_of_that_user_only(top):
    """--user nobody can only create files as nobody: another user, even one the
    directory would let in, is refused rather than given a file of nobody's."""
    saves = top / "saves"
    saves.mkdir(mode=0o777)
    os.chown(saves, NOBODY, NOBODY)
    saves.chmod(0o777)
    src = _image(top / "src.save", 0o644)
    mp = top / "mp"
    with mounted(saves, mp, "--allow-other", "--user", "nobody"):
        r = as_user(NOBODY - 1, "cp", str(src), str(mp / "convert" / "a.save"))
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        r = as_user(NOBODY, "cp", str(src), str(mp / "convert" / "b.save"))
        assert r.returncode == 0, r.stderr
    assert os.listdir(saves) == ["b.save"]
    assert (saves / "b.save").stat().st_uid == NOBODY


def _swapper(saves: Path, decoy: Path, secret: Path, stop: threading.Event, swaps: list[int],
             pause: float = 0.0) -> None:
    """What a user who may write the directory does: x.save is a real image one moment, a
    symlink to root's secret image the next (both renamed into place, atomically)."""
    import random
    n = 0
    while not stop.is_set():
        if pause:
            time.sleep(random.uniform(0, pause))
        tmp = saves / f"t{n}"
        if n % 2:
            os.symlink(secret, tmp)
        else:
            os.link(decoy, tmp)
        os.replace(tmp, saves / "x.save")
        n += 1
        swaps[0] = n


def test_a_symlink_swapped_in_after_listing_is_never_followed_in_process(top):
    """The race, many times over, at the speed of the tree itself: rescans and first opens
    while another thread swaps the name. A libvirt image (the secret) must never show."""
    from ramfs.fs.tree import Tree

    saves = top / "saves"
    saves.mkdir()
    decoy = _image(top / "decoy.save", 0o644, "firmware/pc-mapped-ram.img")  # bare: no domain.xml
    secret = _image(top / "secret.save", 0o600)  # libvirt: has domain.xml
    tree = Tree(cache=str(top / "cache"))
    tree.mount_directory(str(saves))
    stop, swaps = threading.Event(), [0]
    t = threading.Thread(target=_swapper, args=(saves, decoy, secret, stop, swaps))
    t.start()
    shown = rounds = 0
    # 400 rounds at least, and until the name was swapped and the image itself shown often
    # enough: on a busy machine either thread may get most of the time (bounded, so a broken
    # tree still ends).
    deadline = time.monotonic() + 120
    try:
        while (rounds < 400 or shown <= 20 or swaps[0] <= 400) and time.monotonic() < deadline:
            rounds += 1
            tree.rescan(force=True)
            node = tree.root.children.get(b"x.save")
            if node is None:
                continue
            tree.populate(node)
            names = set(node.children)
            assert b"domain.xml" not in names, "the symlink's target was read"
            shown += b"ram" in names
    finally:
        stop.set()
        t.join()
        tree.close()
    assert swaps[0] > 400 and shown > 20, (swaps, shown)  # the race was really run


def test_a_symlink_swapped_in_after_listing_is_never_followed_through_the_mount(top):
    saves = top / "saves"
    saves.mkdir()
    decoy = _image(top / "decoy.save", 0o644, "firmware/pc-mapped-ram.img")
    secret = _image(top / "secret.save", 0o600)
    mp = top / "mp"
    stop, swaps = threading.Event(), [0]
    with mounted(saves, mp, "--allow-other"):
        t = threading.Thread(target=_swapper, args=(saves, decoy, secret, stop, swaps, 0.05))
        t.start()
        seen = 0
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                try:
                    names = os.listdir(mp / "x.save")
                except OSError:
                    continue
                assert "domain.xml" not in names, names
                seen += "ram" in names
        finally:
            stop.set()
            t.join()
    assert seen > 0 and swaps[0] > 100, (seen, swaps)


def test_user_mount_of_a_root_only_directory(top):
    """--user nobody over a 0700 directory of 0600 images (libvirt's save directory): the
    images there at mount time read (opened as root, before the drop); one added later that
    nobody cannot open shows an ERROR saying so. The worker can never regain privileges."""
    saves = top / "saves"
    saves.mkdir(mode=0o700)
    img = _image(saves / "vm.save", 0o600)
    mp = top / "mp"
    with mounted(saves, mp, "--user", "nobody"):
        from ramfs.image import open_image
        with open_image(img) as direct, open(mp / "vm.save" / "ram" / "pc.ram", "rb") as f:
            assert f.read(1 << 20) == bytes(direct.read("pc.ram", 0, 1 << 20))
        _image(saves / "late.save", 0o600)
        deadline = time.monotonic() + 5
        while not (mp / "late.save").exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        text = (mp / "late.save" / "ERROR").read_text()
        assert "Permission denied" in text and "nobody" in text and "late.save" in text
        out = subprocess.run(["pgrep", "-f", f"ramfs.cli mount -f {saves} {mp}"], capture_output=True, text=True)
        workers = []
        for pid in out.stdout.split():
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            if status["Uid"].split()[0] == str(NOBODY):
                workers.append(status)
        assert len(workers) == 1
        w = workers[0]
        assert w["NoNewPrivs"].strip() == "1"
        assert int(w["CapBnd"], 16) == 0 and int(w["CapEff"], 16) == 0 and int(w["CapPrm"], 16) == 0


def _hidden_install(top: Path) -> dict[str, str]:
    """ramfs and its dependencies copied where nobody cannot read (like a pipx install under
    /root), Python run with -S so nothing else is on its path."""
    import pyfuse3
    import trio

    import ramfs
    hidden = top / "hidden"
    hidden.mkdir(mode=0o700)
    site = Path(trio.__file__).parent.parent
    shutil.copytree(Path(ramfs.__file__).parent, hidden / "ramfs", ignore=shutil.ignore_patterns("__pycache__"))
    for entry in site.iterdir():
        if entry.name.startswith(("ramfs", "_distutils", "pip", "setuptools", "__editable__")):
            continue
        if entry.is_dir():
            shutil.copytree(entry, hidden / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        elif entry.suffix in (".py", ".so"):
            shutil.copy2(entry, hidden / entry.name)
    assert (hidden / Path(pyfuse3.__file__).parent.name).is_dir() and (hidden / "ramfs").is_dir()
    return {**os.environ, "PYTHONPATH": str(hidden), "PYTHONDONTWRITEBYTECODE": "1"}


def test_user_worker_needs_nothing_it_cannot_read_after_the_drop(top):
    """Everything the worker uses is loaded before the drop: a mount whose code nobody
    cannot read serves every view and converts, with no error in its log."""
    env = _hidden_install(top)
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    os.chown(saves, NOBODY, NOBODY)
    _image(saves / "vm.save", 0o600)
    src = _image(top / "src.save", 0o644, "firmware/q35-sequential.img")
    mp = top / "mp"
    log = top / "mp.log"
    mp.mkdir()
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-S", "-m", "ramfs.cli", "mount", "-f", "--user", "nobody",
                                 str(saves), str(mp)], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        from mountutil import wait_mounted
        wait_mounted(mp, proc, log)
        n = 0
        for dirpath, _, files in os.walk(mp / "vm.save"):
            for f in files:
                with open(Path(dirpath) / f, "rb") as fh:
                    fh.read(1 << 16)
                    fh.seek(-min(1 << 16, os.fstat(fh.fileno()).st_size), 2)
                    fh.read()
                n += 1
        assert n > 10
        r = subprocess.run(["cp", str(src), str(mp / "convert" / "c.save")], capture_output=True, text=True)
        assert r.returncode == 0, (r.stderr, log.read_text())
        assert "ram" in os.listdir(mp / "c.save")
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text
    assert proc.returncode == 0, text


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_a_user_worker_failure_reaches_the_terminal(top, foreground):
    img = top / "cut.save"
    img.write_bytes(fixture_path("firmware/pc-mapped-ram.img").read_bytes()[:1000])
    img.chmod(0o600)
    mp = top / "mp"
    mp.mkdir()
    args = ["mount"] + (["-f"] if foreground else []) + ["--user", "nobody", str(img), str(mp)]
    r = subprocess.run(ramfs_cmd(*args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("ramfs: error: as nobody: ") and "past the end of the file" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.ismount(mp)


def test_a_root_mount_without_user_says_so_on_the_terminal(top):
    img = _image(top / "vm.save", 0o600)
    mp = top / "mp"
    mp.mkdir()
    r = subprocess.run(ramfs_cmd("mount", str(img), str(mp)), capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert "parsed as root" in r.stderr and "--user" in r.stderr
    finally:
        subprocess.run(ramfs_cmd("umount", str(mp)), capture_output=True, timeout=60)


@pytest.mark.parametrize("command", ["info", "check", "mount"])
def test_a_fifo_is_refused_at_once(top, command):
    fifo = top / "vm.save"
    os.mkfifo(fifo)
    args = [command, str(fifo)] + ([str(top)] if command == "mount" else [])
    r = subprocess.run(ramfs_cmd(*args), capture_output=True, text=True, timeout=30)
    why = f"{fifo} is a FIFO: ramfs reads save images from regular files"
    if command == "check":  # a problem check reports, like a missing file
        assert (r.returncode, r.stdout.strip(), r.stderr) == (1, f"{fifo}: {why}", ""), r
    else:
        assert (r.returncode, r.stderr.strip()) == (2, f"ramfs: error: {why}"), r


def test_a_fifo_in_a_directory_is_not_opened(top):
    saves = top / "saves"
    saves.mkdir()
    os.mkfifo(saves / "pipe.save")
    _image(saves / "vm.save", 0o644)
    mp = top / "mp"
    with mounted(saves, mp):
        assert sorted(os.listdir(mp)) == ["convert", "vm.save"]


def test_the_readmes_fstab_line_mirrors_the_sources(top):
    """mount(8) with the README's options (allow_other, run_as): the same rule applies."""
    found = shutil.which("ramfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert found, "no ramfs on the default PATH: run `make venv` (scripts/link-entry.sh)"
    saves = top / "saves"
    saves.mkdir(mode=0o755)
    _image(saves / "secret.save", 0o600)
    _image(saves / "public.save", 0o644)
    mp = top / "mp"
    mp.mkdir()
    fstab = top / "fstab"
    fstab.write_text(f"{saves} {mp} fuse.ramfs noauto,x-systemd.automount,allow_other,run_as=nobody 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        got = read_as(NOBODY, [mp / "secret.save" / "ram" / "pc.ram", mp / "public.save" / "ram" / "pc.ram"])
        assert list(got.values()) == ["Permission denied", "ok"], got
    finally:
        subprocess.run(ramfs_cmd("umount", str(mp)), capture_output=True, timeout=60)
    assert not os.path.ismount(mp)
