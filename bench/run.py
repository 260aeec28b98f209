"""Run the ramfs benchmarks and write docs/performance.md.

    .venv/bin/python bench/run.py [--sizes 4,8] [--only SECTION,...] [--out docs/performance.md]

Sizes default to $BENCH_SIZES or 4,8 (GiB of guest RAM); images are cached under
$RAMFS_BENCH_CACHE (default /var/tmp/ramfs-bench). Run as root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import benchmarks, gen, report  # noqa: E402 (after sys.path is set)
from bench.util import GIB, log  # noqa: E402 (after sys.path is set)

SECTIONS = {
    "seq_reads": benchmarks.seq_reads,
    "readahead": benchmarks.readahead,
    "big_reads": benchmarks.big_reads,
    "random_reads": benchmarks.random_page_reads,
    "convert": benchmarks.conversion,
    "convert_dir": benchmarks.convert_dir,
    "open": benchmarks.open_times,
}


def _cmd(argv) -> str:
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine(cache: Path) -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(next(x for x in f if x.startswith("MemTotal")).split()[1]) * 1024
    import pyfuse3
    import trio
    commit = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "ramfs"])
    return {
        "CPUs (nproc)": f"{os.cpu_count()} x {cpu}",
        "RAM": f"{mem / GIB:.1f} GiB",
        "kernel": platform.release(),
        "disk (images, outputs)": f"{cache}: {_cmd(['findmnt', '-no', 'SOURCE,FSTYPE,OPTIONS', '-T', str(cache)])}",
        "QEMU": gen.qemu_version(),
        "Python": platform.python_version(),
        "pyfuse3 / trio / libfuse": f"{pyfuse3.__version__} / {trio.__version__} / "
                                    f"{_cmd(['pkg-config', '--modversion', 'fuse3'])}",
        "ramfs": f"git {commit}" + (" + uncommitted changes in ramfs/" if dirty else ""),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def preflight(cache: Path, sizes: list[int]) -> str | None:
    """Refuse early (not an hour in) when the disk or the memory cannot hold the run."""
    missing = [n for n in sizes if not (cache / f"guest-{n}g-{gen.Recipe(n).key()}" / "DONE").is_file()]
    # Each guest: four images of about N/2 GiB of data; the run writes one converted copy at a time.
    need = sum(2 * n for n in missing) + max(sizes) + 2
    free = shutil.disk_usage(cache).free / GIB
    if free < need:
        return (f"{cache} has {free:.0f} GiB free, the run needs about {need} GiB "
                f"(set RAMFS_BENCH_CACHE elsewhere or use smaller BENCH_SIZES)")
    if missing:
        with open("/proc/meminfo") as f:
            avail = int(next(x for x in f if x.startswith("MemAvailable")).split()[1]) * 1024 / GIB
        # The source QEMU holds the guest RAM and a copy of the loader blobs (~0.65 of it).
        if avail < 1.8 * max(missing):
            return (f"generating a {max(missing)} GiB guest needs about {1.8 * max(missing):.0f} GiB of "
                    f"available memory, {avail:.0f} GiB are (use smaller BENCH_SIZES)")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", "4,8"),
                    help="guest RAM sizes in GiB, comma-separated (default: $BENCH_SIZES or 4,8)")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(REPO / "docs" / "performance.md"))
    ap.add_argument("--json", help="also write the raw results here (default: in the cache directory)")
    ap.add_argument("--render", metavar="RESULTS.json",
                    help="measure nothing: write the report of a saved run (targets recomputed from its numbers)")
    a = ap.parse_args(argv)
    if a.render:
        results = json.loads(Path(a.render).read_text())
        results["targets"] = report.targets(results)
        Path(a.out).write_text(report.render(results))
        log(f"wrote {a.out} from {a.render}")
        return 0
    sizes = sorted({int(x) for x in a.sizes.split(",") if x.strip()})
    only = [s.strip() for s in a.only.split(",")] if a.only else list(SECTIONS)
    for s in only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    if os.geteuid() != 0:
        print("bench: run as root (FUSE mounts, dropping the page cache)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    cache = gen.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    problem = preflight(cache, sizes)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    results: dict = {"sizes": sizes, "machine": machine(cache), "timings": {}, "errors": {}}
    timings = results["timings"]

    t = time.monotonic()
    images = {}
    results["images"] = {}
    for i, n in enumerate(sizes):
        recipe = gen.Recipe(n)
        built_before = (gen.cache_root() / f"guest-{n}g-{recipe.key()}" / "DONE").is_file()
        images[n] = gen.guest_images(recipe, verify=(i == 0))
        info = images[n].info
        info["built_now"] = not built_before
        results["images"][str(n)] = info
        log(f"{n} GiB images: {images[n].directory}")
    sparse = gen.sparse_image()
    results["sparse"] = json.loads((sparse.parent / "recipe.json").read_text())
    timings["images (generate or find in cache)"] = time.monotonic() - t

    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = dict(os.environ, RAMFS_CACHE_DIR=str(work / "ramfs-cache"), PYTHONPATH=str(REPO))
    ctx = benchmarks.Ctx(sizes=sizes, images=images, sparse=sparse, work=work, env=env, results=results)
    try:
        for name in only:
            t = time.monotonic()
            log(f"== {name}")
            try:
                SECTIONS[name](ctx)
            except Exception as e:  # noqa: BLE001 - keep going; the report says what failed
                traceback.print_exc()
                results["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            timings[name] = time.monotonic() - t
            log(f"== {name}: {timings[name]:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = time.monotonic() - t_start
    results["machine"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["finished"] = time.strftime("%Y-%m-%d %H:%M %Z")
    results["targets"] = report.targets(results)
    js = Path(a.json) if a.json else cache / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(results))
    log(f"wrote {out} and {js} in {timings['total']:.0f} s")
    for tg in results["targets"]:
        log(f"{'met    ' if tg['ok'] else 'NOT MET'} {tg['value']:.2f} {tg['target']}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
