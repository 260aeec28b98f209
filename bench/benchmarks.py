"""The benchmarks. Each function measures one thing, ramfs and its ceilings in the
same run, and appends plain numbers to ``ctx.results``; bench/report.py turns them into tables.

"cold" always means: dirty data written back and the page cache dropped (``sync``, then
``echo 1 > /proc/sys/vm/drop_caches``) right before the step; "warm" is the same step again
at once. Every ramfs and passthrough daemon runs in the foreground as a child process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import gen
from bench.util import (
    GIB,
    MIB,
    PY,
    dd,
    direct_page_reads,
    drop_caches,
    log,
    median,
    meminfo,
    passthrough_mount,
    ramfs_mount,
    random_reads,
    resident_bytes,
    run_measured,
    vm_hwm,
    warm,
    workdir,
)

DENSE_OFFSET = 16 * MIB  # where every generated guest has its dense run of random pages
KIB128 = 128 * 1024
# (dd block size, range): the whole (4+ GiB) block only at 1 MiB, to keep the run short.
READ_CASES = ((KIB128, "dense"), (MIB, "dense"), (MIB, "whole"))
RANDOM_ROUNDS = 4     # alternating ramfs / passthrough
RANDOM_SECONDS = 4.0  # per system, over all rounds
CONVERT_ROUNDS = 3    # cp and ramfs convert, alternating


@dataclasses.dataclass
class Ctx:
    sizes: list[int]
    images: dict[int, gen.Images]
    sparse: Path
    work: Path  # scratch directory on the same file system as the images
    env: dict  # environment of every ramfs process (RAMFS_CACHE_DIR)
    results: dict
    warm_runs: int = 3
    direct_rounds: int = 3

    @property
    def small(self) -> gen.Images:
        return self.images[self.sizes[0]]

    @property
    def big(self) -> gen.Images:
        return self.images[self.sizes[-1]]


def dense_bytes(recipe: gen.Recipe) -> int:
    n = 0
    for b in gen.plan(recipe):
        if b.offset != DENSE_OFFSET + n or len(b.runs) != 1 or b.runs[0].kind != "random":
            break
        n += b.size
    return n


def block_facts(image: Path, env: dict) -> dict:
    """pc.ram's size and the file offset of its dense range (builds/uses the index cache)."""
    code = ("import json, sys; from ramfs.image import open_image\n"
            "img = open_image(sys.argv[1]); b = img.block('pc.ram')\n"
            f"foff = next(iter(b.runs({DENSE_OFFSET}, 4096)))[0]\n"
            "print(json.dumps({'block_size': b.used_length, 'dense_file_offset': foff,"
            " 'populated_pages': b.populated_pages, 'pages': b.num_pages})); img.close()")
    r = subprocess.run([PY, "-c", code, str(image)], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------ sequential reads

def seq_reads(ctx: Ctx) -> None:
    """dd of ram/pc.ram through ramfs vs the passthrough serving the image file vs dd of the
    image itself: a dense range (1 GiB of random pages) and the whole (half-zero) block, at
    128 KiB and 1 MiB, cold and warm, ramfs and passthrough buffered and with direct I/O."""
    imgs = ctx.small
    dense = min(GIB, dense_bytes(imgs.recipe))
    rows = ctx.results.setdefault("seq_reads", [])
    ctx.results.setdefault("method", {})["direct_rounds"] = ctx.direct_rounds
    for kind in ("mapped", "seq"):
        image = getattr(imgs, kind)
        facts = block_facts(image, ctx.env)
        fsize = image.stat().st_size
        # File ranges 4 KiB-aligned (dd iflag=direct needs that; a page more or less is noise).
        ranges = {"dense": {"ramfs": (DENSE_OFFSET, dense), "file": (facts["dense_file_offset"] // 4096 * 4096, dense)},
                  "whole": {"ramfs": (0, facts["block_size"]), "file": (0, fsize // 4096 * 4096)}}
        for mode in ("buffered", "direct"):
            direct = mode == "direct"
            samples: dict = {}
            # Direct reads go to the disk, whose throughput here drifts by tens of percent
            # within minutes: each case is measured in rounds, the systems taking turns in a
            # rotating order, and the median kept, so drift cannot favour whoever ran first.
            rounds = ctx.direct_rounds if direct else 1
            with workdir(ctx.work, "mnt") as w:
                (w / "rw").mkdir()
                ram = ramfs_mount(image, w / "r", *(["--direct-io"] if direct else []), env=ctx.env)
                try:
                    pt = passthrough_mount(image, w / "rw", w / "p", direct_io=direct)
                    try:
                        paths = {"ramfs": ram.mp / "ram" / "pc.ram", "passthrough": pt.mp / "file",
                                 "dd-image": image}
                        systems = list(paths)
                        for bs, rng in READ_CASES:
                            for r in range(rounds):
                                for system in systems[r % 3:] + systems[:r % 3]:
                                    off, count = ranges[rng]["ramfs" if system == "ramfs" else "file"]
                                    iflag_direct = direct and system == "dd-image"
                                    drop_caches()
                                    cold = dd(paths[system], bs=bs, offset=off, count=count, direct=iflag_direct)
                                    n = ctx.warm_runs if rng == "dense" and not direct else 1
                                    warms = [dd(paths[system], bs=bs, offset=off, count=count,
                                                direct=iflag_direct)["gbps"] for _ in range(n)]
                                    got = samples.setdefault((system, bs, rng),
                                                             {"cold": [], "warm": [], "bytes": count})
                                    got["cold"].append(cold["gbps"])
                                    got["warm"].append(median(warms))
                    finally:
                        pt.close()
                finally:
                    ram.close()
            measured = {key: {"cold": median(v["cold"]), "warm": median(v["warm"]), "bytes": v["bytes"]}
                        for key, v in samples.items()}
            measured[("ramfs", "rss")], measured[("passthrough", "rss")] = ram.hwm, pt.hwm
            log(f"seq reads {kind} {mode}: done ({rounds} round{'s' if rounds > 1 else ''})")
            for bs, rng in READ_CASES:
                for state in ("cold", "warm"):
                    r = measured[("ramfs", bs, rng)][state]
                    p = measured[("passthrough", bs, rng)][state]
                    d = measured[("dd-image", bs, rng)][state]
                    rows.append({"image": f"{imgs.recipe.ram_gib} GiB {kind}", "kind": kind, "mode": mode,
                                 "bs": bs, "range": rng, "state": state,
                                 "ramfs_bytes": measured[("ramfs", bs, rng)]["bytes"],
                                 "file_bytes": measured[("passthrough", bs, rng)]["bytes"],
                                 "ramfs": r, "passthrough": p, "dd_image": d,
                                 "ratio_pt": r / p, "ratio_dd": r / d,
                                 "ramfs_rss": measured[("ramfs", "rss")],
                                 "passthrough_rss": measured[("passthrough", "rss")]})


READAHEAD_SETTINGS = (("keep", None), ("1M", 1024), ("4M", 4096))  # ramfs --readahead, bdi KiB
READAHEAD_ROUNDS = 3


def _set_bdi_readahead(mp: Path, kb: int) -> None:
    """The passthrough gets the same setting as ramfs, written the same way (after INIT)."""
    from ramfs.fs.readahead import mount_device

    dev = mount_device(str(mp))
    if dev is None:
        raise RuntimeError(f"{mp} is not in /proc/self/mountinfo")
    Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")


def readahead(ctx: Ctx) -> None:
    """Sequential 1 MiB reads of the dense range of ram/pc.ram with the mount's readahead left at
    the kernel's 128 KiB (``--readahead keep``, what ramfs did before) and raised to 1 and 4 MiB,
    against the passthrough with the same bdi setting; cold and warm, buffered; rounds with the
    two systems taking turns, median kept."""
    imgs = ctx.small
    dense = min(GIB, dense_bytes(imgs.recipe))
    rows = ctx.results.setdefault("readahead", [])
    for kind in ("mapped", "seq"):
        image = getattr(imgs, kind)
        facts = block_facts(image, ctx.env)
        offsets = {"ramfs": DENSE_OFFSET, "passthrough": facts["dense_file_offset"] // 4096 * 4096}
        for label, kb in READAHEAD_SETTINGS:
            samples: dict = {"ramfs": {"cold": [], "warm": []}, "passthrough": {"cold": [], "warm": []}}
            with workdir(ctx.work, "mnt") as w:
                (w / "rw").mkdir()
                ram = ramfs_mount(image, w / "r", "--readahead", label, env=ctx.env)
                try:
                    pt = passthrough_mount(image, w / "rw", w / "p")
                    try:
                        if kb is not None:
                            _set_bdi_readahead(pt.mp, kb)
                        paths = {"ramfs": ram.mp / "ram" / "pc.ram", "passthrough": pt.mp / "file"}
                        for r in range(READAHEAD_ROUNDS):
                            for system in (("ramfs", "passthrough") if r % 2 == 0 else ("passthrough", "ramfs")):
                                drop_caches()
                                cold = dd(paths[system], bs=MIB, offset=offsets[system], count=dense)
                                hot = dd(paths[system], bs=MIB, offset=offsets[system], count=dense)
                                samples[system]["cold"].append(cold["gbps"])
                                samples[system]["warm"].append(hot["gbps"])
                    finally:
                        pt.close()
                finally:
                    ram.close()
            for state in ("cold", "warm"):
                r, p = median(samples["ramfs"][state]), median(samples["passthrough"][state])
                rows.append({"image": f"{imgs.recipe.ram_gib} GiB {kind}", "readahead": label,
                             "bdi_kb": kb if kb is not None else 128, "state": state, "bytes": dense,
                             "rounds": READAHEAD_ROUNDS,
                             "ramfs": r, "passthrough": p, "ratio_pt": r / p})
            log(f"readahead {kind} {label}: ramfs cold {median(samples['ramfs']['cold']):.2f} GB/s, "
                f"passthrough cold {median(samples['passthrough']['cold']):.2f} GB/s")


def big_reads(ctx: Ctx) -> None:
    """Peak RSS of the mount daemon after reading the whole pc.ram of the biggest guest."""
    imgs = ctx.big
    rows = ctx.results.setdefault("big_reads", [])
    for kind in ("mapped", "seq"):
        image = getattr(imgs, kind)
        block_facts(image, ctx.env)  # index cached beforehand, as for every mount here
        for mode in ("buffered", "direct"):
            with workdir(ctx.work, "mnt") as w:
                m = ramfs_mount(image, w / "mp", *(["--direct-io"] if mode == "direct" else []), env=ctx.env)
                try:
                    drop_caches()
                    r = dd(m.mp / "ram" / "pc.ram", bs=MIB)
                finally:
                    m.close()
            rows.append({"image": f"{imgs.recipe.ram_gib} GiB {kind}", "mode": mode, "gbps": r["gbps"],
                         "bytes": r["bytes"], "seconds": r["seconds"], "daemon_rss": m.hwm,
                         "mount_seconds": m.mount_seconds})
            log(f"big reads {kind} {mode}: {r['gbps']:.2f} GB/s, rss {m.hwm}")


# ------------------------------------------------------------------------------ random reads

def random_page_reads(ctx: Ctx) -> None:
    """Random 4 KiB preads (one process, one at a time) through ramfs vs the passthrough,
    image warm in the host page cache; buffered mounts with POSIX_FADV_RANDOM (no readahead)."""
    imgs = ctx.small
    dense = min(GIB, dense_bytes(imgs.recipe))
    rows = ctx.results.setdefault("random_reads", [])
    ctx.results.setdefault("method", {}).update(random_rounds=RANDOM_ROUNDS, random_seconds=RANDOM_SECONDS)
    for kind in ("mapped", "seq"):
        image = getattr(imgs, kind)
        facts = block_facts(image, ctx.env)
        fsize = image.stat().st_size
        for mode in ("buffered", "direct"):
            direct = mode == "direct"
            with workdir(ctx.work, "mnt") as w:
                (w / "rw").mkdir()
                ram = ramfs_mount(image, w / "r", *(["--direct-io"] if direct else []), env=ctx.env)
                try:
                    pt = passthrough_mount(image, w / "rw", w / "p", direct_io=direct)
                    try:
                        for rng in ("dense", "whole"):
                            if rng == "dense":
                                rlo, rhi = DENSE_OFFSET, DENSE_OFFSET + dense
                                flo, fhi = facts["dense_file_offset"], facts["dense_file_offset"] + dense
                            else:
                                rlo, rhi, flo, fhi = 0, facts["block_size"], 0, fsize // 4096 * 4096
                            warm(image)
                            # Rounds with the order alternating and fresh offsets each round
                            # (the same for both): drift of the disk cancels out, and no round
                            # rereads what an earlier one left in the FUSE page cache.
                            tally = {"ramfs": [0, 0.0], "passthrough": [0, 0.0]}
                            where = {"ramfs": (ram.mp / "ram" / "pc.ram", rlo, rhi),
                                     "passthrough": (pt.mp / "file", flo, fhi)}
                            for r in range(RANDOM_ROUNDS):
                                for system in (("ramfs", "passthrough") if r % 2 == 0 else ("passthrough", "ramfs")):
                                    path, lo, hi = where[system]
                                    got = random_reads(path, lo, hi, limit=RANDOM_SECONDS / RANDOM_ROUNDS,
                                                       seed=r + 1)
                                    tally[system][0] += got["reads"]
                                    tally[system][1] += got["seconds"]
                            a = {"reads": tally["ramfs"][0], "per_s": tally["ramfs"][0] / tally["ramfs"][1]}
                            b = {"reads": tally["passthrough"][0],
                                 "per_s": tally["passthrough"][0] / tally["passthrough"][1]}
                            row = {"image": f"{imgs.recipe.ram_gib} GiB {kind}", "kind": kind, "mode": mode,
                                   "range": rng, "ramfs": a["per_s"], "passthrough": b["per_s"],
                                   "ratio": a["per_s"] / b["per_s"], "reads": a["reads"]}
                            if direct and rng == "dense":
                                # The disk alone: O_DIRECT page reads of the image, aligned 4 KiB
                                # vs where this image stores pages (a sequential image's records
                                # put most pages across two device blocks).
                                pages = dense // 4096
                                stride = 4096 if kind == "mapped" else 4096 + 8
                                al = direct_page_reads(image, flo & ~4095, pages, 4096)
                                at = direct_page_reads(image, flo, pages, stride)
                                row.update(disk_aligned=al["per_s"], disk_at_pages=at["per_s"])
                            rows.append(row)
                            log(f"random {kind} {mode} {rng}: ramfs {a['per_s']:.0f}/s, "
                                f"passthrough {b['per_s']:.0f}/s")
                    finally:
                        pt.close()
                finally:
                    ram.close()


# ------------------------------------------------------------------------------ conversion

def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cp_and_sync(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    _fsync(dst)
    return time.perf_counter() - t0


def ramfs_convert(ctx: Ctx, src: Path, dst: Path, *opts: str) -> dict:
    r = run_measured([PY, "-m", "ramfs.cli", "convert", "-q", *opts, str(src), str(dst)], env=ctx.env)
    if not dst.is_file():
        raise RuntimeError(f"ramfs convert did not write {dst}")
    return r


def qemu_route(recipe: gen.Recipe, src: Path, dst: Path) -> dict:
    """What users do today: a QEMU restores the sequential image and saves it with mapped-ram,
    max-bandwidth unlimited (libvirt's setting for saves). From QEMU's start to the file
    being on disk."""
    t0 = time.perf_counter()
    with gen.scratch() as sc, gen.qemu(gen.qemu_argv(recipe, sc / "q.qmp", incoming=True), sc, "q") as q:
        gen.load(q, src)
        t_load = time.perf_counter() - t0
        gen.save(q, dst, ("mapped-ram",))
        hwm = vm_hwm(q.pid)
    _fsync(dst)
    return {"seconds": time.perf_counter() - t0, "restore_seconds": t_load, "maxrss": hwm}


def conversion(ctx: Ctx) -> None:
    rows = ctx.results.setdefault("convert", [])
    pc_rows = ctx.results.setdefault("convert_pagecache", [])
    for i, n in enumerate(ctx.sizes):
        imgs = ctx.images[n]
        src = imgs.seq
        size = src.stat().st_size
        label = f"{n} GiB seq"

        def add(method, seconds, rss=None, note="", label=label, n=n, size=size):
            rows.append({"image": label, "guest": n, "size": size, "method": method, "seconds": seconds,
                         "gbps": size / seconds / 1e9, "maxrss": rss, "note": note})

        with workdir(ctx.work, "conv") as w:
            # The ratio that matters (ramfs convert vs cp) from alternating rounds, medians kept:
            # this disk's speed moves by tens of percent between minutes, and a single pair
            # measured one after the other carries that drift into the ratio.
            runs: dict = {"cp": [], "ramfs": []}
            rss = []
            for r in range(CONVERT_ROUNDS):
                for which in (("cp", "ramfs") if r % 2 == 0 else ("ramfs", "cp")):
                    drop_caches()
                    if which == "cp":
                        runs["cp"].append(cp_and_sync(src, w / "copy.img"))
                        (w / "copy.img").unlink()
                    else:
                        got = ramfs_convert(ctx, src, w / "out.img")
                        (w / "out.img").unlink()
                        runs["ramfs"].append(got["seconds"])
                        rss.append(got["maxrss"])

            def runs_note(xs):
                return f"median of {len(xs)} alternating runs: " + ", ".join(f"{x:.1f}" for x in xs) + " s"

            cp_s = median(runs["cp"])
            add("cp + fsync (ceiling)", cp_s, note=runs_note(runs["cp"]))
            add("ramfs convert --jobs 1", median(runs["ramfs"]), max(rss), note=runs_note(runs["ramfs"]))
            log(f"{label}: cp {runs['cp']}, ramfs convert {runs['ramfs']}")
            variants = []
            if i == 0:
                variants += [("ramfs convert --jobs 2", ("--jobs", "2")),
                             ("ramfs convert --jobs 4", ("--jobs", "4")),
                             ("ramfs convert --direct-io", ("--direct-io",)),
                             ("ramfs convert --jobs 4 --direct-io", ("--jobs", "4", "--direct-io"))]
            for name, opts in variants:
                drop_caches()
                c0 = meminfo("Cached")
                r = ramfs_convert(ctx, src, w / "out.img", *opts)
                c1 = meminfo("Cached")
                if "--direct-io" in opts:
                    pc_rows.append({"image": label, "method": name, "size": size, "cached_growth": c1 - c0,
                                    "src_resident": resident_bytes(src),
                                    "dst_resident": resident_bytes(w / "out.img"),
                                    "dst_size": (w / "out.img").stat().st_size})
                (w / "out.img").unlink()
                add(name, r["seconds"], r["maxrss"])
                log(f"{label}: {name} {r['seconds']:.1f} s, rss {r['maxrss'] >> 20} MiB")
            if i == 0:
                lsize = imgs.lv_raw.stat().st_size
                drop_caches()
                r = ramfs_convert(ctx, imgs.lv_raw, w / "out.img")
                (w / "out.img").unlink()
                rows.append({"image": f"{n} GiB libvirt raw", "guest": n, "size": lsize,
                             "method": "ramfs convert --jobs 1",
                             "seconds": r["seconds"], "gbps": lsize / r["seconds"] / 1e9, "maxrss": r["maxrss"],
                             "note": "libvirt format 0 -> format 6"})
            drop_caches()
            q = qemu_route(imgs.recipe, src, w / "qemu.img")
            (w / "qemu.img").unlink()
            add("QEMU restore + save mapped-ram", q["seconds"], q["maxrss"],
                note=f"restore {q['restore_seconds']:.1f} s")
            log(f"{label}: QEMU route {q['seconds']:.1f} s, rss {q['maxrss'] >> 20} MiB")


def convert_dir(ctx: Ctx) -> None:
    """cp of the sequential image into a directory mount's convert/ vs cp into the passthrough's
    writable directory (+ fsync through the mount), with and without the writeback cache."""
    rows = ctx.results.setdefault("convert_dir", [])
    for i, n in enumerate(ctx.sizes):
        imgs = ctx.images[n]
        src = imgs.seq
        size = src.stat().st_size
        with workdir(ctx.work, "cdir") as w:
            out = w / "out"
            out.mkdir()
            m = ramfs_mount(out, w / "mp", env=ctx.env)
            try:
                drop_caches()
                t0 = time.perf_counter()
                subprocess.run(["cp", str(src), str(m.mp / "convert" / "x.img")], check=True)
                secs = time.perf_counter() - t0
            finally:
                m.close()
            if not (out / "x.img").is_file():
                raise RuntimeError(f"cp into convert/ left no {out / 'x.img'}: {sorted(os.listdir(out))}")
            rows.append({"image": f"{n} GiB seq", "size": size, "target": "ramfs convert/", "seconds": secs,
                         "gbps": size / secs / 1e9, "daemon_rss": m.hwm})
            log(f"{n} GiB: cp into convert/ {secs:.1f} s, daemon rss {m.hwm >> 20} MiB")
            shutil.rmtree(out)
            for wb in ((False, True) if i == 0 else (False,)):
                rw = w / "rw"
                rw.mkdir()
                p = passthrough_mount(src, rw, w / "pt", writeback=wb)
                try:
                    drop_caches()
                    t0 = time.perf_counter()
                    subprocess.run(["cp", str(src), str(p.mp / "rw" / "x.img")], check=True)
                    _fsync(p.mp / "rw" / "x.img")
                    secs = time.perf_counter() - t0
                finally:
                    p.close()
                if (rw / "x.img").stat().st_size != size:
                    raise RuntimeError(f"the passthrough wrote {(rw / 'x.img').stat().st_size} bytes, not {size}")
                rows.append({"image": f"{n} GiB seq", "size": size,
                             "target": "passthrough rw/" + (" (writeback cache)" if wb else ""),
                             "seconds": secs, "gbps": size / secs / 1e9, "daemon_rss": p.hwm, "writeback": wb})
                log(f"{n} GiB: cp into passthrough (writeback={wb}) {secs:.1f} s")
                shutil.rmtree(rw)


# ------------------------------------------------------------------------------ open / index

OPEN_SNIPPET = (
    "import sys, time\n"
    "from ramfs.image import open_image\n"
    "t = time.perf_counter()\n"
    "img = open_image(sys.argv[1], use_cache=sys.argv[2] == '1')\n"
    "dt = time.perf_counter() - t\n"
    "print(dt, int(img.index_from_cache))\n"
    "img.close()\n")


def _open(ctx: Ctx, image: Path, cache_dir: Path, *, use_cache: bool) -> dict:
    env = dict(ctx.env, RAMFS_CACHE_DIR=str(cache_dir))
    r = run_measured([PY, "-c", OPEN_SNIPPET, str(image), "1" if use_cache else "0"], env=env)
    secs, cached = r["stdout"].split()
    return {"seconds": float(secs), "from_cache": cached == "1", "maxrss": r["maxrss"], "wall": r["seconds"]}


def open_times(ctx: Ctx) -> None:
    rows = ctx.results.setdefault("open", [])
    with workdir(ctx.work, "open") as w:
        sp = ctx.sparse
        drop_caches()
        cold = _open(ctx, sp, w / "c0", use_cache=True)
        warm_ = _open(ctx, sp, w / "c0", use_cache=True)
        rows.append({"image": f"{gen.SPARSE_GIB} GiB sparse mapped-ram", "what": "open (cold)",
                     "size": sp.stat().st_size,
                     "seconds": cold["seconds"], "maxrss": cold["maxrss"]})
        rows.append({"image": f"{gen.SPARSE_GIB} GiB sparse mapped-ram", "what": "open (warm)",
                     "size": sp.stat().st_size,
                     "seconds": warm_["seconds"], "maxrss": warm_["maxrss"]})
        drop_caches()
        m = ramfs_mount(sp, w / "mp", env=dict(ctx.env, RAMFS_CACHE_DIR=str(w / "c0")))
        m.close()
        rows.append({"image": f"{gen.SPARSE_GIB} GiB sparse mapped-ram", "what": "ramfs mount -f until mounted (cold)",
                     "size": sp.stat().st_size, "seconds": m.mount_seconds, "maxrss": m.hwm})
        log(f"sparse open {cold['seconds']:.3f} s, mount {m.mount_seconds:.2f} s")
        targets = [(n, "seq") for n in ctx.sizes] + [(ctx.sizes[0], "lv_raw")]
        for n, kind in targets:
            image = getattr(ctx.images[n], kind)
            size = image.stat().st_size
            name = f"{n} GiB {'sequential' if kind == 'seq' else 'libvirt raw'}"
            cdir = w / f"c-{n}-{kind}"
            drop_caches()
            first = _open(ctx, image, cdir, use_cache=True)
            assert not first["from_cache"]
            warm_build = _open(ctx, image, w / "unused", use_cache=False)
            drop_caches()
            second = _open(ctx, image, cdir, use_cache=True)
            assert second["from_cache"], "second open did not use the cached index"
            rows.append({"image": name, "what": "index build, first open (cold)", "size": size,
                         "seconds": first["seconds"], "gbps": size / first["seconds"] / 1e9, "maxrss": first["maxrss"]})
            rows.append({"image": name, "what": "index build (image in page cache)", "size": size,
                         "seconds": warm_build["seconds"], "gbps": size / warm_build["seconds"] / 1e9,
                         "maxrss": warm_build["maxrss"]})
            rows.append({"image": name, "what": "second open, cached index (cold)", "size": size,
                         "seconds": second["seconds"], "maxrss": second["maxrss"]})
            log(f"{name}: index {first['seconds']:.2f} s cold, {warm_build['seconds']:.2f} s warm, "
                f"cached {second['seconds']:.3f} s")
        for n in ctx.sizes:
            image = ctx.images[n].mapped
            drop_caches()
            r = _open(ctx, image, w / "cm", use_cache=True)
            rows.append({"image": f"{n} GiB mapped-ram", "what": "open (cold)", "size": image.stat().st_size,
                         "seconds": r["seconds"], "maxrss": r["maxrss"]})
