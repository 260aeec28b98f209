"""Load: 16 threads reading random ranges of several images and blocks while a conversion
runs into convert/, compared with ground truth. ``make stress`` runs it for 60 s."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
import time

from conftest import sparse_copy
from fixture_data import fixture_path
from mountutil import mounted
from ramfs.image import open_image

SECONDS = float(os.environ.get("RAMFS_STRESS_SECONDS", "5"))
THREADS = 16
IMAGES = ["firmware/pc-sequential.img", "firmware/q35-mapped-ram.img", "libvirt/fw-pc-zstd.img",
          "libvirt/fw-pc-sparse-parallel4.img"]


def test_concurrent_reads_during_a_conversion(tmp_path):
    backing = tmp_path / "saves"
    backing.mkdir()
    truth: dict[tuple[str, str], bytes] = {}
    for name in IMAGES:
        dst = backing / os.path.basename(name)
        sparse_copy(fixture_path(name), dst)
        with open_image(dst) as img:
            for b in img.blocks:
                truth[(dst.name, b.idstr)] = bytes(img.read(b, 0, b.used_length))
    mp = tmp_path / "mp"
    errors: list = []
    counts = [0] * THREADS
    stop_at = time.monotonic() + SECONDS

    def path_of(image, idstr):
        return mp / image / "ram" / idstr.lstrip("/")

    def reader(i):
        rng = random.Random(i)
        keys = list(truth)
        try:
            while time.monotonic() < stop_at:
                key = rng.choice(keys)
                data = truth[key]
                off = rng.randrange(len(data))
                size = rng.choice([1, 512, 4096, 4097, 65536, 1 << 20])
                with open(path_of(*key), "rb", buffering=0) as f:
                    got = os.pread(f.fileno(), size, off)
                if got != data[off:off + size]:
                    errors.append((key, off, size))
                counts[i] += 1
        except OSError as e:
            errors.append(repr(e))

    with mounted(backing, mp):
        src = fixture_path("libvirt/fw-pc-raw.img")
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        conversions = 0
        while time.monotonic() < stop_at:
            name = f"conv{conversions}.save"
            r = subprocess.run(["cp", str(src), str(mp / "convert" / name)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            conversions += 1
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert sum(counts) > THREADS * 10
    assert conversions >= 1
    want = hashlib.sha256(fixture_path("libvirt/fw-pc-pmemsave.bin").read_bytes()).hexdigest()
    with open_image(backing / "conv0.save") as img:
        assert hashlib.sha256(img.read("pc.ram", 0, 64 << 20)).hexdigest() == want
    print(f"\n{sum(counts)} reads by {THREADS} threads and {conversions} conversions in {SECONDS:.0f} s, "
          f"0 mismatches")
    shutil.rmtree(backing)
