"""Large, realistic save images for the benchmarks, made by real QEMU and cached.

For a guest of N GiB (``pc`` machine, SeaBIOS only, KVM when available) this writes:

* ``seq.img``: ``migrate file:`` of the guest (sequential stream), bare;
* ``mapped.img``: the same RAM saved with capability ``mapped-ram`` by a fresh QEMU that
  restored ``seq.img`` (QEMU refuses a second migrate in one process);
* ``lv-raw.img``: a libvirt header (format 0, raw) + domain XML + ``seq.img``;
* ``lv-sparse.img``: a libvirt header (format 6, sparse) + domain XML, then QEMU's mapped-ram
  stream written with ``file:PATH,offset=N`` (mapped-ram offsets are absolute, so it must be
  QEMU that writes it after the prefix, exactly as libvirt does);
* ``recipe.json``: the recipe, the page mix actually written, timings, and for the smallest
  size the proof that ``mapped.img`` restores in real QEMU with byte-equal memory.

RAM content comes from ``-device loader`` blobs, written as sparse files and deleted as soon
as QEMU has loaded them. The layout of ``pc.ram`` (offsets in the RAM block):

* ``[16 MiB, 16 MiB + N/4)``: one dense run of random pages (for "dense block" reads);
* the rest of the usable RAM is cut into 16 MiB segments; enough of them are "mixed" (runs of
  1..512 pages of random data, repeated patterns and zero pages) to bring the totals to about
  40 % random, 10 % patterns; the other segments are never touched (zeros), so about 50 % of
  all pages are zero, partly in long runs, partly scattered between data;
* nothing below 16 MiB or within 64 MiB of the top of low RAM (SeaBIOS works there), nothing
  in the PCI hole: with N >= 3.5 GiB ``pc`` maps ``pc.ram[3 GiB:]`` at guest-physical 4 GiB.

Other RAM blocks come from the machine itself: ``pc.bios``, ``pc.rom``, ``vga.vram`` and the
VGA option ROM (``-device VGA``), and the small ACPI ``/rom@etc/...`` blocks.

Plus ``sparse64.img``: a 64 GiB guest (memory-backend ``reserve=off``, nothing loaded) saved
with mapped-ram: 64 GiB logical, a few MiB allocated, for the open-time benchmark.

The cache lives under ``$RAMFS_BENCH_CACHE`` (default ``/var/tmp/ramfs-bench``), one
directory per recipe key (recipe, QEMU version, generator version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from qemu_images import QemuProcess, qemu_binary, qemu_version  # noqa: E402 (after sys.path is set)

GEN_VERSION = 1
PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited", as libvirt sets it for a save
MIGRATION_TIMEOUT = 1800.0
LOW_RESERVED = 16 * MIB  # legacy areas and SeaBIOS data
TOP_RESERVED = 64 * MIB  # SeaBIOS relocates itself and its tables to the top of low RAM
PC_SPLIT_THRESHOLD = 0xE0000000  # pc: RAM >= 3.5 GiB is split, 3 GiB below 4G
PC_LOW_WHEN_SPLIT = 0xC0000000


def cache_root() -> Path:
    return Path(os.environ.get("RAMFS_BENCH_CACHE") or "/var/tmp/ramfs-bench")


def log(msg: str) -> None:
    print(f"[gen] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ recipes

@dataclasses.dataclass(frozen=True)
class Recipe:
    ram_gib: int
    seed: int = 10
    dense_fraction: float = 0.25  # of RAM, one contiguous run of random pages at 16 MiB
    random_fraction: float = 0.40
    pattern_fraction: float = 0.10
    mixed_zero: float = 0.30  # share of zero pages inside the mixed segments
    segment_mib: int = 16
    max_run_pages: int = 512
    max_blob_mib: int = 256  # QEMU's loader reads a file with one read(): stay far below 2 GiB
    devices: tuple[str, ...] = ("VGA",)
    run_seconds: float = 0.5

    @property
    def ram(self) -> int:
        return self.ram_gib * GIB

    @property
    def low(self) -> int:
        return PC_LOW_WHEN_SPLIT if self.ram >= PC_SPLIT_THRESHOLD else self.ram

    def gpa(self, offset: int) -> int:
        """Guest-physical address of a pc.ram offset."""
        return offset if offset < self.low else offset + (4 * GIB - self.low)

    def key(self) -> str:
        material = "\n".join([repr(self), qemu_version(), f"gen {GEN_VERSION}"])
        return hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Run:
    page: int  # first page, relative to the blob
    pages: int
    kind: str  # "random", "pattern", "zero"
    pattern: int = 0


@dataclasses.dataclass
class Blob:
    offset: int  # in pc.ram
    size: int
    runs: list[Run]


def plan(recipe: Recipe) -> list[Blob]:
    """Where the loader blobs go and what each of their pages is (deterministic)."""
    rng = random.Random(recipe.seed)
    seg = recipe.segment_mib * MIB
    low_lo, low_hi = LOW_RESERVED, recipe.low - TOP_RESERVED
    ranges = [(low_lo, low_hi)]
    if recipe.ram > recipe.low:
        ranges.append((recipe.low, recipe.ram))
    dense = int(recipe.dense_fraction * recipe.ram) // seg * seg
    dense = max(0, min(dense, (low_hi - low_lo) // seg * seg - seg))
    blobs: list[Blob] = []
    pos = low_lo
    while pos < low_lo + dense:
        n = min(recipe.max_blob_mib * MIB, low_lo + dense - pos)
        blobs.append(Blob(pos, n, [Run(0, n // PAGE, "random")]))
        pos += n
    segments = []
    for lo, hi in ranges:
        start = max(lo, low_lo + dense) if lo == low_lo else lo
        start = (start + seg - 1) // seg * seg
        segments += list(range(start, hi - seg + 1, seg))
    rest_random = max(0.0, recipe.random_fraction * recipe.ram - dense)
    rest_pattern = recipe.pattern_fraction * recipe.ram
    data_per_segment = seg * (1 - recipe.mixed_zero)
    m = min(len(segments), math.ceil((rest_random + rest_pattern) / data_per_segment))
    chosen = sorted(rng.sample(segments, m))
    w_random = (1 - recipe.mixed_zero) * rest_random / max(1.0, rest_random + rest_pattern)
    max_log = math.log(recipe.max_run_pages + 1)
    cur: Blob | None = None
    for s in chosen:
        if cur is None or cur.offset + cur.size != s or cur.size + seg > recipe.max_blob_mib * MIB:
            cur = Blob(s, 0, [])
            blobs.append(cur)
        base = (s - cur.offset) // PAGE
        p = 0
        while p < seg // PAGE:
            n = min(int(math.exp(rng.uniform(0, max_log))), seg // PAGE - p)
            n = max(1, n)
            x = rng.random()
            kind = "zero" if x < recipe.mixed_zero else "random" if x < recipe.mixed_zero + w_random else "pattern"
            cur.runs.append(Run(base + p, n, kind, rng.randrange(4)))
            p += n
        cur.size += seg
    return blobs


def mix_of(recipe: Recipe, blobs: list[Blob]) -> dict:
    pages = recipe.ram // PAGE
    count = {"random": 0, "pattern": 0}
    for b in blobs:
        for r in b.runs:
            if r.kind in count:
                count[r.kind] += r.pages
    return {"pages": pages, "random_pages": count["random"], "pattern_pages": count["pattern"],
            "zero_pages_at_most": pages - count["random"] - count["pattern"],
            "random_pct": round(100 * count["random"] / pages, 1),
            "pattern_pct": round(100 * count["pattern"] / pages, 1),
            "zero_pct": round(100 * (pages - count["random"] - count["pattern"]) / pages, 1),
            "loader_blobs": len(blobs), "loader_bytes": sum(b.size for b in blobs)}


def pattern_page(kind: int, seed: int, gpa_page: int) -> bytes:
    if kind == 0:
        return b"\xff" * PAGE
    if kind == 1:
        return b"\xef\xbe\xad\xde\xbe\xba\xfe\xca" * (PAGE // 8)
    if kind == 2:
        return struct.pack("<1024I", *range(1024))
    unit = b"RAMFS-BENCH-%d-PAGE-%010d " % (seed, gpa_page)
    return (unit * (PAGE // len(unit) + 1))[:PAGE]


class RandomStream:
    """Incompressible bytes, deterministic per seed: AES-128-CTR keystream from ``openssl``
    (about 1 GB/s), or Python's ``random`` (about 0.2 GB/s) without openssl."""

    def __init__(self, seed: int):
        key = hashlib.sha256(b"ramfs-bench-%d" % seed).hexdigest()
        self.proc = None
        self.rng = None
        if shutil.which("openssl"):
            self.proc = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key[:32],
                                          "-iv", key[32:64], "-bufsize", str(4 * MIB), "-in", "/dev/zero"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        else:
            self.rng = random.Random(key)

    def read(self, n: int) -> bytearray:
        if self.rng is not None:
            return bytearray(self.rng.randbytes(n))
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            k = self.proc.stdout.readinto(view[got:])
            if not k:
                raise RuntimeError("openssl stopped producing random bytes")
            got += k
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def write_blobs(recipe: Recipe, blobs: list[Blob], directory: Path) -> list[tuple[int, Path]]:
    """Write each blob as a sparse file; returns (guest-physical address, path)."""
    out = []
    rnd = RandomStream(recipe.seed)
    try:
        for i, b in enumerate(blobs):
            path = directory / f"blob-{i:03d}.bin"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for r in b.runs:
                    off = r.page * PAGE
                    if r.kind == "zero":
                        continue
                    if r.kind == "random":
                        left = r.pages * PAGE
                        while left:
                            n = min(left, 64 * MIB)
                            _pwrite_all(fd, rnd.read(n), off)
                            off += n
                            left -= n
                    else:
                        first = recipe.gpa(b.offset) // PAGE + r.page
                        if r.pattern == 3:
                            data = b"".join(pattern_page(3, recipe.seed, first + k) for k in range(r.pages))
                        else:
                            data = pattern_page(r.pattern, recipe.seed, first) * r.pages
                        _pwrite_all(fd, data, off)
                os.ftruncate(fd, b.size)
            finally:
                os.close(fd)
            out.append((recipe.gpa(b.offset), path))
    finally:
        rnd.close()
    return out


def _pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


# ------------------------------------------------------------------------------ QEMU

def qemu_argv(recipe: Recipe, qmp: Path, *, loaders=(), incoming: bool = False) -> list[str]:
    argv = [qemu_binary(), "-accel", "kvm", "-accel", "tcg", "-cpu", "qemu64,kvmclock=off",
            "-machine", "pc", "-m", f"{recipe.ram_gib}G", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    for dev in recipe.devices:
        argv += ["-device", dev]
    for addr, path in loaders:
        argv += ["-device", f"loader,file={path},addr={addr:#x},force-raw=on"]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


@contextlib.contextmanager
def scratch():
    d = Path(tempfile.mkdtemp(prefix="ramfs-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def qemu(argv: list[str], scratch_dir: Path, name: str):
    sock = scratch_dir / f"{name}.qmp"
    with QemuProcess(argv, sock, scratch_dir / f"{name}.log") as q:
        yield q


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_migration(q: QemuProcess, what: str, timeout: float = MIGRATION_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = q.qmp.execute("query-migrate")
        st = info.get("status")
        if st == "completed":
            return info
        if st in ("failed", "cancelled"):
            raise RuntimeError(f"{what}: {st}: {info.get('error-desc')}\n{q.describe()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still {st} after {timeout:.0f} s")
        time.sleep(0.05)


def save(q: QemuProcess, path: Path, caps=(), offset: int = 0) -> dict:
    if caps:
        q.qmp.execute("migrate-set-capabilities",
                      capabilities=[{"capability": c, "state": True} for c in caps])
    q.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    uri = f"file:{path}" + (f",offset={offset:#x}" if offset else "")
    q.qmp.execute("migrate", uri=uri)
    return wait_migration(q, f"save to {path}")


def load(q: QemuProcess, path: Path, caps=(), offset: int = 0) -> None:
    if caps:
        q.qmp.execute("migrate-set-capabilities",
                      capabilities=[{"capability": c, "state": True} for c in caps])
    uri = f"file:{path}" + (f",offset={offset:#x}" if offset else "")
    q.qmp.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})
    wait_migration(q, f"restore of {path}")


def memory_hashes(q: QemuProcess, recipe: Recipe, scratch_dir: Path) -> dict[str, str]:
    """sha1 of guest RAM (above 1 MiB; and above 4 GiB when split), streamed by ``pmemsave``
    through a FIFO so nothing of guest size is written to disk."""
    ranges = [(0x100000, recipe.low)]
    if recipe.ram > recipe.low:
        ranges.append((4 * GIB, recipe.ram - recipe.low))
    out = {}
    for start, size in ranges:
        fifo = scratch_dir / "pmem.fifo"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
        result = {}

        def reader(fifo=fifo, result=result):
            h = hashlib.sha1()
            n = 0
            with open(fifo, "rb", buffering=0) as f:
                while chunk := f.read(4 * MIB):
                    h.update(chunk)
                    n += len(chunk)
            result["hash"], result["n"] = h.hexdigest(), n

        t = threading.Thread(target=reader)
        t.start()
        try:
            q.qmp.execute("pmemsave", val=start, size=size, filename=str(fifo))
        finally:
            t.join()
        if result.get("n") != size:
            raise RuntimeError(f"pmemsave of {size:#x} at {start:#x} gave {result.get('n')} bytes")
        out[f"{start:#x}+{size:#x}"] = result["hash"]
    return out


# ------------------------------------------------------------------------------ libvirt

def libvirt_prefix(recipe: Recipe, fmt: int, complete: bool) -> bytes:
    """A libvirt header (version 2) and data area (domain XML, cookie, 64 KiB padding) for the
    guest, modelled on the shipped firmware fixture (tests/data/libvirt/fw-pc-raw.xml)."""
    xml = (REPO / "tests/data/libvirt/fw-pc-raw.xml").read_text()
    kib = recipe.ram // 1024
    xml = xml.replace("<memory unit='KiB'>65536</memory>", f"<memory unit='KiB'>{kib}</memory>")
    xml = xml.replace("<currentMemory unit='KiB'>65536</currentMemory>",
                      f"<currentMemory unit='KiB'>{kib}</currentMemory>")
    xml = xml.replace("ramfs-fixture-fw-pc", f"ramfs-bench-{recipe.ram_gib}g")
    cookie = (f"<qemu-migration>\n  <name>ramfs-bench-{recipe.ram_gib}g</name>\n"
              "  <uuid>52414d46-5346-4958-0001-000000000001</uuid>\n"
              "  <hostname>bench</hostname>\n</qemu-migration>\n")
    data = xml.encode() + b"\0"
    cookie_offset = len(data)
    data += cookie.encode() + b"\0"
    data += bytes(64 * 1024)
    magic = b"LibvirtQemudSave" if complete else b"LibvirtQemudPart"
    header = struct.pack("<16s5I14I", magic, 2, len(data), 0, fmt, cookie_offset, *([0] * 14))
    return header + data


def copy_range(src: Path, dst_fd: int, dst_off: int) -> None:
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(f.fileno(), dst_fd, min(size - done, 1 << 30), done, dst_off + done)
            if n <= 0:
                raise RuntimeError(f"copy_file_range stopped at {done} of {size}")
            done += n


# ------------------------------------------------------------------------------ builds

IMAGES = ("seq.img", "mapped.img", "lv-raw.img", "lv-sparse.img")


@dataclasses.dataclass
class Images:
    recipe: Recipe
    directory: Path

    def __getattr__(self, name):
        names = {"seq": "seq.img", "mapped": "mapped.img", "lv_raw": "lv-raw.img",
                 "lv_sparse": "lv-sparse.img"}
        if name in names:
            return self.directory / names[name]
        raise AttributeError(name)

    @property
    def info(self) -> dict:
        return json.loads((self.directory / "recipe.json").read_text())


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(final: Path, build) -> Path:
    if (final / "DONE").is_file():
        return final
    with _locked(final.parent / (final.name + ".lock")):
        if (final / "DONE").is_file():
            return final
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        work = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(work)
            (work / "DONE").write_text("done\n")
            work.chmod(0o755)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final


def guest_images(recipe: Recipe, *, verify: bool) -> Images:
    """The four images of ``recipe``, built on a cache miss. ``verify``: prove once that
    mapped.img restores in real QEMU with the guest's exact memory (recorded in recipe.json;
    a cached build without the proof is rebuilt)."""
    final = cache_root() / f"guest-{recipe.ram_gib}g-{recipe.key()}"
    if (final / "DONE").is_file() and verify and not Images(recipe, final).info.get("verified"):
        shutil.rmtree(final)
    _cached(final, lambda work: _build_guest(recipe, work, verify))
    return Images(recipe, final)


def _build_guest(recipe: Recipe, work: Path, verify: bool) -> None:
    t_all = time.monotonic()
    steps: dict[str, float] = {}
    info: dict = {"recipe": dataclasses.asdict(recipe), "qemu_version": qemu_version(),
                  "generator_version": GEN_VERSION}

    def step(name, t0):
        steps[name] = round(time.monotonic() - t0, 2)
        log(f"{recipe.ram_gib} GiB: {name}: {steps[name]:.1f} s")
        return time.monotonic()

    t = time.monotonic()
    blobs = plan(recipe)
    info["mix"] = mix_of(recipe, blobs)
    blob_dir = work / "blobs"
    blob_dir.mkdir()
    loaders = write_blobs(recipe, blobs, blob_dir)
    t = step("write loader blobs", t)
    seq, mapped, lv_raw, lv_sparse = (work / n for n in IMAGES)
    with scratch() as sc:
        with qemu(qemu_argv(recipe, sc / "src.qmp", loaders=loaders), sc, "src") as q:
            shutil.rmtree(blob_dir)  # loaded: QEMU holds them in memory now
            t = step("start guest (load blobs)", t)
            time.sleep(recipe.run_seconds)
            q.qmp.execute("stop")
            info["accelerator"] = "kvm" if q.qmp.execute("query-kvm").get("enabled") else "tcg"
            if verify:
                info["ground_truth_sha1"] = memory_hashes(q, recipe, sc)
                t = step("hash guest memory (pmemsave)", t)
            save(q, seq)
            info["source_qemu_vmhwm_kib"] = vm_hwm_kib(q.pid)
            t = step("save sequential", t)
        with qemu(qemu_argv(recipe, sc / "re.qmp", incoming=True), sc, "re") as q:
            load(q, seq)
            t = step("restore sequential", t)
            save(q, mapped, ("mapped-ram",))
            t = step("save mapped-ram", t)
        prefix_raw = libvirt_prefix(recipe, 0, True)
        fd = os.open(lv_raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _pwrite_all(fd, prefix_raw, 0)
            copy_range(seq, fd, len(prefix_raw))
        finally:
            os.close(fd)
        t = step("libvirt raw (header + copy)", t)
        part = libvirt_prefix(recipe, 6, False)
        fd = os.open(lv_sparse, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        with open(lv_sparse, "r+b") as f:
            f.write(part)
        with qemu(qemu_argv(recipe, sc / "lv.qmp", incoming=True), sc, "lv") as q:
            load(q, seq)
            save(q, lv_sparse, ("mapped-ram",), offset=len(part))
        with open(lv_sparse, "r+b") as f:  # as libvirt does: header (complete) written last
            f.write(libvirt_prefix(recipe, 6, True))
            os.fsync(f.fileno())
        t = step("libvirt sparse (QEMU, offset)", t)
        if verify:
            with qemu(qemu_argv(recipe, sc / "ck.qmp", incoming=True), sc, "ck") as q:
                load(q, mapped, ("mapped-ram",))
                got = memory_hashes(q, recipe, sc)
            if got != info["ground_truth_sha1"]:
                raise RuntimeError(f"mapped.img does not restore to the guest's memory: {got} != "
                                   f"{info['ground_truth_sha1']}")
            info["verified"] = {"image": "mapped.img", "how": "restored by QEMU -incoming defer with "
                                "mapped-ram, pmemsave sha1 of every RAM range equal to the source guest's"}
            t = step("verify mapped-ram restore", t)
    subprocess.run(["sync"], check=True)
    info["files"] = {n: {"size": (work / n).stat().st_size, "allocated": (work / n).stat().st_blocks * 512}
                     for n in IMAGES}
    info["build_steps_seconds"] = steps
    info["build_seconds"] = round(time.monotonic() - t_all, 1)
    info["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (work / "recipe.json").write_text(json.dumps(info, indent=1) + "\n")


SPARSE_GIB = 64


def sparse_image(ram_gib: int = SPARSE_GIB) -> Path:
    """A ``ram_gib`` GiB guest that never touched its RAM, saved with mapped-ram."""
    key = hashlib.sha256(f"sparse {ram_gib}\n{qemu_version()}\ngen {GEN_VERSION}".encode()).hexdigest()[:16]
    final = cache_root() / f"sparse-{ram_gib}g-{key}"

    def build(work: Path) -> None:
        t = time.monotonic()
        with scratch() as sc:
            argv = [qemu_binary(), "-accel", "kvm", "-accel", "tcg", "-cpu", "qemu64,kvmclock=off",
                    "-object", f"memory-backend-ram,id=pc.ram,size={ram_gib}G,reserve=off",
                    "-machine", "pc,memory-backend=pc.ram", "-m", f"{ram_gib}G", "-smp", "1",
                    "-nodefaults", "-no-user-config", "-display", "none",
                    "-qmp", f"unix:{sc / 's.qmp'},server=on,wait=off"]
            with qemu(argv, sc, "s") as q:
                time.sleep(0.5)
                q.qmp.execute("stop")
                save(q, work / "sparse.img", ("mapped-ram",))
        st = (work / "sparse.img").stat()
        (work / "recipe.json").write_text(json.dumps({
            "ram_gib": ram_gib, "qemu_version": qemu_version(), "size": st.st_size,
            "allocated": st.st_blocks * 512, "build_seconds": round(time.monotonic() - t, 1)}, indent=1) + "\n")
        log(f"sparse {ram_gib} GiB image: {time.monotonic() - t:.1f} s")

    return _cached(final, build) / "sparse.img"


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="build (or find) the benchmark images")
    ap.add_argument("--sizes", default="4,8")
    ap.add_argument("--plan-only", action="store_true")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    for i, n in enumerate(sizes):
        r = Recipe(n)
        if a.plan_only:
            print(json.dumps(mix_of(r, plan(r))))
            continue
        imgs = guest_images(r, verify=(i == 0))
        print(imgs.directory)
    if not a.plan_only:
        print(sparse_image())
