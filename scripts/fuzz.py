"""Fuzz the format parser and image reader (``make fuzz``).

    .venv/bin/python scripts/fuzz.py [--cases 100000] [--seed 1] [--out tests/fuzz/regressions]
    .venv/bin/python scripts/fuzz.py --replay          # re-run every saved regression
    .venv/bin/python scripts/fuzz.py --write-seeds DIR # the seed images, as files
    .venv/bin/python scripts/fuzz.py --only qcow2      # mutate only the qcow2 seeds

Seeds are small images built from the real fixtures (tests/fuzz/seeds.py) and real qcow2 disks
with internal snapshots (tests/data/qcow2/, tests/fuzz/qcow2.py); each case stacks
structure-aware mutations (tests/fuzz/mutate.py) and goes through every way of opening and
reading an image (tests/fuzz/harness.py). A failure whose signature is new is shrunk and saved
as ``<out>/<sha>.bin`` + ``.json``: tests/test_fuzz.py replays everything saved there.
Failures of bugs already saved there (``"status": "open"``) are only counted.

Exit status: 0 when no new failure was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import resource
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # before scripts/, so ``fuzz`` is tests/fuzz/
sys.path.insert(1, str(REPO))


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # the harness lets it through every step (a SystemExit would be a finding)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="where failures go (default tests/fuzz/regressions)")
    ap.add_argument("--trace-fraction", type=float, default=0.2,
                    help="share of cases run under tracemalloc (default 0.2)")
    ap.add_argument("--deep-fraction", type=float, default=0.2,
                    help="share of cases also opened through the cache and the CLI (default 0.2)")
    ap.add_argument("--no-minimize", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--only", default=None, metavar="PREFIX",
                    help="mutate only the seeds whose name starts so (e.g. qcow2)")
    ap.add_argument("--as-limit-mib", type=int, default=4096,
                    help="address space allowed beyond the start-up size (RLIMIT_AS; 0: none)")
    ap.add_argument("--replay", action="store_true", help="re-run the saved regressions and exit")
    ap.add_argument("--reminimize", action="store_true",
                    help="shrink the saved regressions again (longer budget) and exit")
    ap.add_argument("--write-seeds", type=Path, default=None, help="write the seed images there and exit")
    ap.add_argument("--write-repros", nargs="*", default=None, metavar="NAME",
                    help="write the hand-made bug reproducers (tests/fuzz/repro.py) to --out and exit")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` shows where a run is
    # `kill <pid>` unwinds (the temporary directory on /dev/shm is removed) instead of dying.
    signal.signal(signal.SIGTERM, _interrupt)

    from fuzz import harness
    from fuzz.seeds import build_seeds

    out = args.out or harness.REGRESSIONS
    if args.write_seeds:
        args.write_seeds.mkdir(parents=True, exist_ok=True)
        for c in build_seeds():
            img = harness.assemble(c)
            harness.write_image(str(args.write_seeds / f"{c.name}.img"), img)
            print(f"{c.name}.img  {img.size} bytes")
        return 0
    if args.write_repros is not None:
        from fuzz import repro
        repro.write(out, args.write_repros)
        return 0
    if args.as_limit_mib:
        # A runaway allocation becomes a MemoryError (a failure), not a machine out of memory.
        lim = _vm_size() + (args.as_limit_mib << 20)
        resource.setrlimit(resource.RLIMIT_AS, (lim, resource.RLIM_INFINITY))
    if args.replay:
        bad = 0
        with harness.Runner() as runner:
            for name, img, meta in harness.load_regressions(out):
                res = harness.replay(runner, img, meta)
                got = sorted({f.signature for f in res.failures})
                print(f"{name}: status {meta.get('status')}: "
                      + ("; ".join(f"{f.kind} in {f.step}: {f.message}" for f in res.failures) or "passes"))
                bad += bool(got) != (meta.get("status") == "open")
        return 1 if bad else 0

    if args.reminimize:
        with harness.Runner() as runner:
            for name, img, meta in harness.load_regressions(out):
                sigs = [f["signature"] for f in meta.get("failures", [])]
                if not sigs or len(img.segments) != 1:
                    continue
                res = harness.replay(runner, img, meta)
                f = next((f for f in res.failures if f.signature == sigs[0]), None)
                if f is None:
                    print(f"{name}: does not fail as saved ({sigs[0]}); left alone")
                    continue
                small = harness.minimize(runner, img, f, budget_s=180)
                if small.size < img.size:
                    keep = {k: v for k, v in meta.items() if k not in ("failures", "image", "read_seed")}
                    keep["read_seed"] = 0
                    keep["minimized_size"] = small.size
                    p = harness.save_failure(out, small, f, keep)
                    if p.stem != name:
                        (out / f"{name}.bin").unlink()
                        (out / f"{name}.json").unlink()
                    print(f"{name}: {img.size} -> {small.size} bytes: {p.name}")
        return 0

    known = harness.known_signatures(out)
    t0 = time.monotonic()
    st = harness.fuzz(args.cases, args.seed, out_dir=out, trace_fraction=args.trace_fraction,
                      deep_fraction=args.deep_fraction, minimize_failures=not args.no_minimize,
                      log=lambda m: print(m, flush=True), max_seconds=args.max_seconds, known=known,
                      only=args.only)
    wall = time.monotonic() - t0
    print()
    print(f"cases        {st.cases} in {wall:.0f} s ({st.cases / wall:.0f} cases/s; "
          f"{st.seconds:.0f} s inside cases)")
    print(f"outcomes     {st.outcomes} distinct (corpus {st.corpus})")
    print(f"slowest      {st.slowest:.2f} s: {st.slowest_case}")
    print(f"memory       tracemalloc peak {st.peak / 2**20:.1f} MiB, resident growth {st.rss / 2**20:.1f} MiB")
    print(f"known bugs   {sum(st.known.values())} failures of {len(st.known)} saved signatures")
    print(f"new failures {st.failures} ({len(st.by_signature)} signatures)")
    for sig, n in sorted(st.by_signature.items(), key=lambda x: -x[1]):
        print(f"  {n:6}  {sig}")
    for p in st.saved:
        print(f"saved {p}")
    return 1 if st.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
