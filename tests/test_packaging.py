"""pip install of a built wheel gives working commands (the README's way for users)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_installs_working_commands_and_the_man_page(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(dist.glob("ramfs-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("data/data/share/man/man1/ramfs.1") for n in names), names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    assert "volatility3/plugins/ramfs_saveimage.py" in names
    assert not any(n.startswith("volatility3/") and n.endswith("__init__.py") for n in names)  # not ours
    assert {f"ramfs/{p.parent.relative_to(REPO / 'ramfs')}/__init__.py".replace("/./", "/")
            for p in (REPO / "ramfs").rglob("__init__.py")} <= set(names)  # every subpackage listed
    r = subprocess.run([str(pip), "install", "-q", "--disable-pip-version-check", f"{wheel}[volatility]"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    version = subprocess.run([str(venv / "bin" / "ramfs"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "pyfuse3" in version.stdout and "libfuse 3." in version.stdout
    helped = subprocess.run([str(venv / "bin" / "ramfs-mount"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: ramfs mount" in helped.stdout
    assert (venv / "share" / "man" / "man1" / "ramfs.1").read_text().startswith(".TH RAMFS 1")
    # With the volatility extra, Volatility 3's own `vol` reads save images through ramfs:
    # the Linux guest's banners at their guest-physical addresses, no plugin option needed.
    import qemu_images as qi
    from test_volatility import banners_in_guest, vol_banners, vol_env
    guest = qi.build_linux()
    got = vol_banners([str(venv / "bin" / "vol")], guest.sequential, vol_env(tmp_path))
    assert got == banners_in_guest(guest.sequential) and got


def test_pipx_install_gives_ramfs(tmp_path):
    import os
    import shutil
    # A clean copy of the tree: pipx builds from it as a user's checkout would be.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__",
                                                             ".pytest_cache"))
    # The README's commands, with tmp_path for /opt/pipx and /usr/local.
    local = tmp_path / "usr-local"
    env = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(local / "bin"))
    r = subprocess.run(["pipx", "install", str(src)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    ramfs = str(local / "bin" / "ramfs")
    out = subprocess.run([ramfs, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ramfs ") and "libfuse 3." in out.stdout
    assert (local / "bin" / "ramfs-mount").exists()
    man1 = local / "share" / "man" / "man1"
    man1.mkdir(parents=True)
    (man1 / "ramfs.1").write_text(subprocess.run([ramfs, "manpage"], capture_output=True, text=True,
                                                 check=True).stdout)
    found = subprocess.run(["man", "-M", str(local / "share" / "man"), "-w", "ramfs"], capture_output=True, text=True)
    assert found.stdout.strip() == str(man1 / "ramfs.1"), found
    # What mount.fuse3's shell would find: this install only when it is on the default path.
    last = out.stdout.splitlines()[-1]
    assert last.startswith("mount -t fuse.ramfs ")
    shell = subprocess.run(["env", "-u", "PATH", "/bin/sh", "-c", "command -v ramfs"], capture_output=True, text=True)
    if shell.returncode == 0:
        assert last.startswith(f"mount -t fuse.ramfs runs {shell.stdout.strip()}"), (last, shell.stdout)
    else:
        assert "no ramfs on" in last and "ln -s" in last, last
