"""Opt-in forensics cross-check: ``make forensics``.

    .venv/bin/python scripts/forensics.py [--image IMG] [--symbols DIR] [--vmlinux FILE]
                                          [--qemu-image IMG] [--qemu-args 'ARGS'] [--cache DIR]

One Linux guest, four views of its memory:

* ``qemu.elf``: QEMU's own ``dump-guest-memory`` (paging=false) of the guest restored from
  ``--qemu-image`` (default: the fixture's ``raw`` image; with ``--image`` given, that image);
* ``core.elf``: ``ramfs core IMAGE``;
* ``phys.mem``: ``ramfs phys IMAGE``;
* the save image itself, through ramfs's Volatility layer (``vol -p ramfs/vol_plugin``).

Checks: Volatility 3 ``linux.pslist.PsList`` (with the kernel's ISF) lists the same
(PID, PPID, COMM) on all four; ``crash`` runs ``sys``, ``ps`` and ``foreach bt`` on
``core.elf`` and on ``qemu.elf`` with the same output except the DUMPFILE line. The debug
vmlinux crash needs is ``apt-get download``ed (Debian's ``linux-image-RELEASE-dbg``, the
release and version taken from the banner in the guest's memory) unless ``--vmlinux`` is given.

Everything reusable is cached under ``--cache`` (``$RAMFS_FORENSICS_CACHE``, default
``/var/tmp/ramfs-forensics``): decompressed images, the vmlinux, QEMU's dump, Volatility's
and ramfs's caches (``XDG_CACHE_HOME``). ``core.elf``, ``phys.mem`` and every tool run are
redone each time, since they are what is checked. Not part of ``make test``.

Exit status: 0 when everything agrees, 1 when something differs or a tool fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "linux"
DEFAULT_IMAGE = FIXTURE / "linux-q35-sparse.img.xz"
DEFAULT_QEMU_IMAGE = FIXTURE / "linux-q35-raw.img.xz"
DEFAULT_SYMBOLS = SHARED / "forensics" / "symbols"
VOL_PLUGIN = REPO / "ramfs" / "vol_plugin"
CRASH_COMMANDS = "sys\nps\nforeach bt\nexit\n"
BANNER = re.compile(rb"Linux version (\S+) \([^\n\0]*?\)[^\n\0]*?#\d+ [^\n\0]*")
DEBIAN_VERSION = re.compile(rb" Debian (\S+) \(")
TOOL_TIMEOUT = 1800

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(1, str(REPO))


class Failure(Exception):
    pass


def tool(name: str) -> str:
    """The venv's copy of a tool (next to this Python) before the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise Failure(f"{name} not found (run make venv)")
    return found


def run(argv: list[str], *, env: dict | None = None, cwd: Path | None = None, what: str) -> str:
    try:
        r = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, errors="replace", timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise Failure(f"{what}: timed out after {TOOL_TIMEOUT} s") from None
    if r.returncode != 0:
        raise Failure(f"{what}: exit status {r.returncode}\n  $ {shlex.join(argv)}\n"
                      + "".join(f"  | {line}\n" for line in r.stderr.splitlines()[-15:]))
    return r.stdout


def file_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            p = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


def decompressed(path: Path, cache: Path) -> Path:
    """``path`` itself, or for ``*.xz`` its decompressed copy in the cache (made once)."""
    if path.suffix != ".xz":
        return path
    out = cache / "images" / file_key(path) / path.stem
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        with open(tmp, "wb") as f:
            subprocess.run(["xz", "-dc", str(path)], stdout=f, check=True)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------------- QEMU's dump

# The device model of the Linux fixture's guest (libvirt domain
# ramfs-fixture-linux-q35, TCG), from build-notes.json
# linux.libvirt_qemu_argv_last_restore, minus what only libvirt needs
# (secrets, fds, sandbox, kernel/initrd: fw_cfg files are not migrated).
# Its serial port is migrated, so it must exist; its backend does not.
def linux_q35_libvirt():
    import qemu_images as qi
    return qi.MachineArgs(args=(
        '-machine', 'pc-q35-10.0,usb=off,dump-guest-core=off,memory-backend=pc.ram,acpi=on',
        '-accel', 'tcg',
        '-cpu', 'qemu64,hypervisor=on,lahf-lm=on',
        '-m', '128M',
        '-object', 'memory-backend-ram,id=pc.ram,size=134217728',
        '-overcommit', 'mem-lock=off',
        '-smp', '1,sockets=1,cores=1,threads=1',
        '-uuid', '52414d46-5346-4958-0002-000000000002',
        '-display', 'none', '-no-user-config', '-nodefaults',
        '-rtc', 'base=utc', '-no-shutdown', '-boot', 'strict=on',
        '-chardev', 'null,id=charserial0',
        '-device', 'isa-serial,chardev=charserial0,id=serial0,index=0',
        '-global', 'ICH9-LPC.noreboot=off',
        '-watchdog-action', 'reset',
    ), ram_bytes=128 << 20)


def qemu_dump(image: Path, qemu_args: tuple[str, ...] | None, cache: Path) -> Path:
    import qemu_images as qi
    from ramfs.image import open_image

    machine = linux_q35_libvirt() if qemu_args is None else qi.MachineArgs(qemu_args, 1)
    out = cache / "qemu" / (file_key(image, machine.args, qi.qemu_version()) + ".elf")
    if out.exists():
        return out
    with open_image(image, use_cache=False) as img:
        if img.format is not None and img.format.compressed:
            raise Failure(f"{image}: QEMU cannot restore a compressed libvirt image; "
                          "give an uncompressed one of the same guest with --qemu-image")
        offset = img.libvirt.header.stream_offset if img.libvirt is not None else 0
        capabilities = ("mapped-ram",) if img.layout.mapped_ram else ()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.unlink(missing_ok=True)
    with qi._scratch_dir() as scratch, qi._start(machine, scratch, "dump", incoming=True) as q:
        q.load(image, capabilities, offset)
        q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": "file:" + str(tmp)})
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------- the kernel

def banners(path: Path) -> list[bytes]:
    """Every Linux banner in a file, read in chunks (a match is taken from the chunk where it
    starts before the last ``overlap`` bytes, or at the end of the file)."""
    found: dict[int, bytes] = {}
    overlap, chunk = 4096, 64 << 20
    with open(path, "rb") as f:
        base, buf = 0, b""
        while True:
            data = f.read(chunk)
            buf += data
            for m in BANNER.finditer(buf):
                if not data or m.start() < len(buf) - overlap:
                    found.setdefault(base + m.start(), m.group(0))
            if not data:
                break
            cut = max(0, len(buf) - overlap)
            base, buf = base + cut, buf[cut:]
    return list(found.values())


def fetch_vmlinux(guest_banners: list[bytes], cache: Path) -> tuple[Path, str]:
    """Debian's debug vmlinux for the guest's kernel: ``linux-image-RELEASE-dbg``, pinned to
    the Debian version in the banner when the archive has it."""
    if not guest_banners:
        raise Failure("no 'Linux version' banner in core.elf: cannot tell which kernel to fetch "
                      "(give --vmlinux)")
    banner = max(set(guest_banners), key=guest_banners.count)
    release = BANNER.match(banner).group(1).decode()
    m = DEBIAN_VERSION.search(banner)
    version = m.group(1).decode() if m else None
    package = f"linux-image-{release}-dbg"
    out = cache / "vmlinux" / (f"{release}_{version}" if version else release) / f"vmlinux-{release}"
    if out.exists():
        return out, f"{package}={version}, cached"
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    for d in work.glob("*.deb"):
        d.unlink()
    spec = f"{package}={version}" if version else package
    try:
        run(["apt-get", "download", spec], cwd=work, what=f"apt-get download {spec}")
    except Failure:
        if version is None:
            raise
        spec = package
        run(["apt-get", "download", spec], cwd=work, what=f"apt-get download {spec}")
    deb = next(work.glob("*.deb"))
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        x = subprocess.run(["tar", "-xO", f"./usr/lib/debug/boot/vmlinux-{release}"],
                           stdin=tar.stdout, stdout=f)
        tar.stdout.close()
        if tar.wait() or x.returncode:
            raise Failure(f"could not extract vmlinux-{release} from {deb.name}")
    tmp.rename(out)
    deb.unlink()
    return out, spec


def check_vmlinux(vmlinux: Path, guest_banners: list[bytes]) -> None:
    ours = {b.rstrip(b"\n") for b in guest_banners}
    theirs = {b.rstrip(b"\n") for b in banners(vmlinux)}
    if not ours & theirs:
        def short(bs):
            return ", ".join(b[:60].decode(errors="replace") + "..." for b in sorted(bs)[:2]) or "none"
        raise Failure(f"{vmlinux} is not the guest's kernel: its banner ({short(theirs)}) is not "
                      f"in guest memory ({short(ours)})")


def ensure_crash() -> str:
    if not shutil.which("crash"):
        print("crash not found: apt-get install crash", flush=True)
        run(["apt-get", "install", "-y", "-q", "crash"], what="apt-get install crash")
    return shutil.which("crash")


# ---------------------------------------------------------------------------- the checks

def pslist(path: Path, symbols: Path, env: dict, *, plugin: bool) -> list[tuple[int, int, str]]:
    argv = [tool("vol"), "-q", "--offline", "-r", "json", "-s", str(symbols)]
    if plugin:
        argv += ["-p", str(VOL_PLUGIN)]
    argv += ["-f", str(path), "linux.pslist.PsList"]
    out = run(argv, env=env, what=f"vol linux.pslist.PsList on {path.name}")
    try:
        rows = json.loads(out)
    except json.JSONDecodeError as e:
        raise Failure(f"vol on {path.name}: no JSON ({e}): {out[:300]!r}") from None
    tasks = sorted((r["PID"], r["PPID"], r["COMM"]) for r in rows)
    if not tasks:
        raise Failure(f"vol on {path.name}: no tasks")
    return tasks


def crash(crash_bin: str, vmlinux: Path, dump: Path, work: Path, label: str) -> list[str]:
    cmds = work / "crash-cmds"
    cmds.write_text(CRASH_COMMANDS)
    out = run([crash_bin, "-s", "-i", str(cmds), str(vmlinux), str(dump)],
              what=f"crash on {dump.name}")
    lines = [line for line in out.splitlines() if not line.lstrip().startswith("DUMPFILE:")]
    if not any("RELEASE:" in line for line in lines):
        raise Failure(f"crash on {dump.name}: no 'sys' output:\n{out[:500]}")
    (work / f"crash-{label}.txt").write_text(out)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="the save image (.xz is decompressed into the cache); "
                    f"default {DEFAULT_IMAGE}")
    ap.add_argument("--qemu-image", type=Path,
                    help="an uncompressed image of the same guest for QEMU to restore and dump; "
                    "default: the fixture's raw image, or --image when that is given")
    ap.add_argument("--qemu-args", help="QEMU's command line for the guest (without -qmp, -S, "
                    "-incoming); default: the fixture's device model (tests/qemu_images.py)")
    ap.add_argument("--symbols", type=Path, default=DEFAULT_SYMBOLS,
                    help="Volatility symbol directory (-s); default %(default)s")
    ap.add_argument("--vmlinux", type=Path, help="the kernel's debug vmlinux for crash; default: "
                    "fetched from Debian by the guest's banner")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("RAMFS_FORENSICS_CACHE") or "/var/tmp/ramfs-forensics"))
    args = ap.parse_args()

    t_start = time.monotonic()
    timings: list[tuple[str, float]] = []

    def timed(label, fn, *a, **kw):
        t = time.monotonic()
        result = fn(*a, **kw)
        timings.append((label, time.monotonic() - t))
        return result

    cache = args.cache.resolve()
    work = cache / "run"
    xdg = cache / "xdg"
    xdg.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg))  # Volatility's and ramfs's caches
    env.pop("RAMFS_CACHE_DIR", None)
    failures: list[str] = []
    print(f"cache: {cache}", flush=True)
    try:
        for p in (args.image, args.qemu_image, args.vmlinux, args.symbols):
            if p is not None and not p.exists():
                raise Failure(f"{p}: no such file or directory")
        src = args.image or DEFAULT_IMAGE
        qsrc = args.qemu_image or (args.image if args.image else DEFAULT_QEMU_IMAGE)
        image = timed("decompress", decompressed, src, cache)
        qemu_image = decompressed(qsrc, cache)
        qemu_args = tuple(shlex.split(args.qemu_args)) if args.qemu_args else None
        qemu_elf = timed("QEMU restore + dump-guest-memory", qemu_dump, qemu_image, qemu_args, cache)

        work.mkdir(exist_ok=True)
        core, phys = work / "core.elf", work / "phys.mem"
        for f in (core, phys):
            f.unlink(missing_ok=True)
        timed("ramfs core", run, [tool("ramfs"), "core", "-q", str(image), str(core)], env=env,
              what="ramfs core")
        timed("ramfs phys", run, [tool("ramfs"), "phys", "-q", str(image), str(phys)], env=env,
              what="ramfs phys")

        guest_banners = banners(core)
        if args.vmlinux:
            vmlinux, vmlinux_from = args.vmlinux.resolve(), "--vmlinux"
        else:
            vmlinux, vmlinux_from = timed("vmlinux", fetch_vmlinux, guest_banners, cache)
        check_vmlinux(vmlinux, guest_banners)
        crash_bin = ensure_crash()

        views = [("QEMU dump-guest-memory", qemu_elf, False), ("ramfs core", core, False),
                 ("ramfs phys", phys, False), ("save image (ramfs layer)", image, True)]
        # The first run fills Volatility's cache (symbol identifiers); the rest run in parallel.
        lists: dict[str, list] = {}
        crash_out: dict[str, list] = {}
        job_times: dict[str, float] = {}

        def job(name, fn, *a, **kw):
            t = time.monotonic()
            try:
                return fn(*a, **kw)
            except Failure as e:
                failures.append(str(e))
            finally:
                job_times[name] = time.monotonic() - t

        def vol_job(view):
            name, path, plugin = view
            tasks = job(name, pslist, path, args.symbols, env, plugin=plugin)
            if tasks is not None:
                lists[name] = tasks

        def crash_job(label, dump):
            out = job("crash " + label, crash, crash_bin, vmlinux, dump, work, label)
            if out is not None:
                crash_out[label] = out

        t = time.monotonic()
        first = [] if (xdg / "volatility3" / "identifier.cache").exists() else views[:1]
        for v in first:
            vol_job(v)
        with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(vol_job, v) for v in views if v not in first]
            futures += [pool.submit(crash_job, *d) for d in (("qemu", qemu_elf), ("core", core))]
            for f in futures:
                f.result()
        timings.append(("Volatility x4 + crash x2", time.monotonic() - t))

        print()
        print(f"image:    {src}")
        print(f"QEMU:     {qsrc}")
        print(f"symbols:  {args.symbols}")
        print(f"vmlinux:  {vmlinux} ({vmlinux_from})")
        if guest_banners:
            banner = max(set(guest_banners), key=guest_banners.count)
            version = DEBIAN_VERSION.search(banner)
            print(f"kernel:   {BANNER.match(banner).group(1).decode()}"
                  + (f", Debian {version.group(1).decode()}" if version else "")
                  + f" (from {len(guest_banners)} banners in core.elf)")
        print()
        print("Volatility 3 linux.pslist.PsList (PID, PPID, COMM):")
        reference = lists.get(views[0][0])
        for name, _path, _ in views:
            tasks = lists.get(name)
            if tasks is None:
                state = "FAILED"
            elif reference is None:
                state = "no reference"
            elif tasks is reference:
                state = "(the reference)"
            elif tasks == reference:
                state = "same as QEMU's"
            else:
                diff = sorted(set(tasks) ^ set(reference))
                state = f"DIFFERENT ({len(diff)} lines, e.g. {diff[:3]})"
                failures.append(f"pslist on {name} differs from QEMU's dump")
            count = len(tasks) if tasks is not None else "-"
            print(f"  {name:26} {count:>4} tasks  {state:16} {job_times.get(name, 0):6.1f} s")
        if reference:
            init = [t for t in reference if t[0] == 1]
            print(f"  e.g. {init[:1]} ... {reference[-1:]}")
        print()
        print("crash (sys, ps, foreach bt; DUMPFILE line left out):")
        a, b = crash_out.get("qemu"), crash_out.get("core")
        if a is None or b is None:
            print("  FAILED")
        elif a == b:
            tasks = next((line.split()[-1] for line in a if line.strip().startswith("TASKS:")), "?")
            print(f"  core.elf and QEMU's dump: identical ({len(a)} lines; TASKS: {tasks})   "
                  f"{job_times['crash qemu']:.1f} s, {job_times['crash core']:.1f} s")
        else:
            import difflib
            failures.append("crash output differs between core.elf and QEMU's dump")
            print("  DIFFERENT:")
            for line in list(difflib.unified_diff(a, b, "qemu.elf", "core.elf", lineterm=""))[:20]:
                print("  " + line)
        print(f"  (full outputs: {work}/crash-*.txt)")
    except Failure as e:
        failures.append(str(e))
    except Exception as e:  # QEMU errors from tests/qemu_images.py, ramfs errors
        failures.append(f"{type(e).__name__}: {e}")

    print()
    print("timings: " + ", ".join(f"{w} {s:.1f} s" for w, s in timings)
          + f"; total {time.monotonic() - t_start:.1f} s")
    if failures:
        print("\nFAILED:")
        for f in failures:
            print("  " + f.rstrip().replace("\n", "\n  "))
        return 1
    print("OK: the same tasks on all four views; crash's output identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
