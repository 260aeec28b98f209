"""The tree's threading rule (ramfs/fs/tree.py, class Tree): worker threads compute, the
loop alone changes the tree. Checked by the tree itself, and through a real mount while
images come and go under readers that list, stat and statfs all the time."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time

from conftest import sparse_copy
from fixture_data import fixture_path
from mountutil import mounted
from ramfs.fs.tree import Tree


def test_only_the_owning_thread_changes_the_tree(tmp_path):
    d = tmp_path / "saves"
    d.mkdir()
    sparse_copy(fixture_path("firmware/pc-mapped-ram.img"), d / "a.save")
    tree = Tree(cache=str(tmp_path / "cache"))
    try:
        tree.mount_directory(str(d))
        node = tree.root.children[b"a.save"]
        errors = []

        built = []

        def worker():
            built.append(tree.build_image(node))  # computing is fine anywhere
            try:
                tree.attach_image(node, built[0])  # changing is not
            except RuntimeError as e:
                errors.append(e)
            shutil.copy(fixture_path("firmware/q35-sequential.img"), d / "b.save")
            plan = tree.scan(force=True)
            try:
                tree.apply(plan)
            except RuntimeError as e:
                errors.append(e)
            errors.append(plan)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert [type(e) for e in errors[:2]] == [RuntimeError, RuntimeError]
        assert b"b.save" not in tree.root.children and node.pending
        tree.apply(errors[2])  # the loop's thread applies what the worker found
        assert b"b.save" in tree.root.children
        tree.attach_image(node, built[0])  # ... and what it built
        assert b"ram" in node.children and node.children[b"ram"].inode in tree.nodes
    finally:
        tree.close()


def test_readers_during_hot_add_and_remove(tmp_path):
    backing = tmp_path / "saves"
    backing.mkdir()
    src = tmp_path / "src.save"
    sparse_copy(fixture_path("firmware/pc-mapped-ram.img"), src)
    mp = tmp_path / "mp"
    stop = threading.Event()
    problems: list[str] = []
    counts = {"ops": 0, "changes": 0}

    def churn():
        i = 0
        while not stop.is_set():
            name = backing / f"vm{i % 4}.save"
            if name.exists():
                name.unlink()
            else:
                tmp = backing / f".tmp{i}"
                os.link(src, tmp)
                os.replace(tmp, name)
            counts["changes"] += 1
            i += 1
            time.sleep(0.05)

    def read():
        while not stop.is_set():
            try:
                os.statvfs(mp)
                for name in os.listdir(mp):
                    p = mp / name
                    os.stat(p)
                    if name.endswith(".save"):
                        for sub in os.listdir(p):
                            os.stat(p / sub)
                        with open(p / "ram" / "pc.ram", "rb") as f:
                            assert len(f.read(4096)) == 4096
                counts["ops"] += 1
            except FileNotFoundError:
                pass  # an image gone between the listing and the look: what a reader sees
            except OSError as e:
                if e.errno != errno.ENOENT:
                    problems.append(repr(e))
            except Exception as e:  # noqa: BLE001 - collected and reported below
                problems.append(repr(e))

    with mounted(backing, mp):
        threads = [threading.Thread(target=churn)] + [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join()
        time.sleep(1.2)  # one rescan interval: the listing settles
        assert sorted(n for n in os.listdir(mp) if n != "convert") == sorted(
            n for n in os.listdir(backing) if not n.startswith("."))
    assert not problems, problems[:5]
    assert counts["ops"] > 20 and counts["changes"] > 20, counts
