"""The fuzzing oracle and loop: write a case, open it every way ramfs can, judge what happens.

One case is one file (on tmpfs). :meth:`Runner.run` then

1. opens it with ``open_image(path, use_cache=False)``; if that works, reads ranges of every
   block (start, end, straddling the end, random, populated ranges), walks
   ``populated_ranges``/``has_data``, and calls ``describe()`` (whose result must be JSON);
   then decodes the device state by the VM description (``vmstate.parse_devices``, the CPU
   states, ``cpus_of``), reads through the guest-physical map (``phys_map``, ``PhysView``) and
   through the lazy views of a mount (``SequentialExport``, ``ElfCore``);
2. calls ``check(path)`` (a streaming open with ``allow_partial``); every problem must be a
   non-empty string;
3. for a compressed libvirt image (formats 1-5), opens it with the cache in a per-run
   directory, reads, and opens it again from that cache: both must read the same bytes;
   for ``deep`` cases of other images, does the same (index cache) and compares with step 1;
4. for ``deep`` cases, runs the CLI in-process (``info``, ``info --json``, ``check``) with a
   strict UTF-8 stdout, as a terminal would have: it must return an exit code.

A case **fails** when any step raises anything but a :class:`ramfs.errors.RamfsError` with a
non-empty message (or an ``internal:`` one, which ramfs uses for states it thinks
impossible), when a step takes over 1 s (confirmed by re-running that step untraced, best of
three), when a step allocates over 64 MiB, when two ways of reading disagree, or when the case
leaves a file descriptor open. Each failure gets a *signature* (the exception type and the
innermost ramfs function; for a slow step the function with the most own time under
cProfile; for a big one the ramfs function that allocated the most at the peak) so that one
bug is saved once, and the known bugs (tests/fuzz/regressions, ``"status": "open"``) are
recognised.

Memory is measured per step, two ways. ``tracemalloc`` sees every Python allocation
(including ``calloc``'d buffers that are never touched) but slows a case down 2-4x, so it
runs on a deterministic fraction of the cases (and always on regression replays). The peak
resident size (``VmHWM``, reset before each step through ``/proc/self/clear_refs``) costs
nothing and runs on every case; it sees touched memory, from Python or C, but also what the
allocator keeps after frees, so its limit is 96 MiB. A wall-clock watchdog cannot be used
in-process under pytest-timeout (which owns SIGALRM), so a CPU-time one (SIGPROF, 10 s)
stops a step that runs away, which is then reported as slow. The
stand-alone runner (scripts/fuzz.py) also caps the address space (``RLIMIT_AS``) so that a
runaway allocation becomes a MemoryError, i.e. a failure, instead of taking the machine down.
"""

from __future__ import annotations

import base64
import bz2
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ramfs.errors import RamfsError
from ramfs.image import open_image
from ramfs.image.describe import check, describe

from fuzz.seeds import Case, build_seeds

TIME_LIMIT = 1.0
MEM_LIMIT = 64 << 20
# The resident size also counts what the allocator keeps after a free (glibc raises its mmap
# threshold after big frees, so later big buffers come from the heap and stay resident):
# it is the backstop for C allocations, with room for that slack; tracemalloc is exact.
RSS_LIMIT = 96 << 20
HANG_CPU_S = 10
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


# --- turning a case into a file ---------------------------------------------------------------

@dataclass
class Image:
    """What to write: data segments at file offsets, and the file size (holes elsewhere)."""

    segments: list[tuple[int, bytes]]
    size: int
    snapshot: str | None = None  # a qcow2 disk: open this snapshot's VM state


    @property
    def dense(self) -> bytes:
        """The first segment: the whole file when there is one segment and no hole."""
        return self.segments[0][1] if self.segments else b""

    def sha(self) -> str:
        h = hashlib.sha256()
        for off, data in self.segments:
            h.update(struct.pack("<QQ", off, len(data)))
            h.update(data)
        h.update(struct.pack("<Q", self.size))
        if self.snapshot is not None:
            h.update(b"snapshot:" + self.snapshot.encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def to_json(self) -> dict:
        out = {"size": self.size, "segments": [
            {"offset": off, "length": len(data)} if i == 0 else
            {"offset": off, "data_b64": base64.b64encode(data).decode()}
            for i, (off, data) in enumerate(self.segments)]}
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot
        return out

    @classmethod
    def load(cls, bin_path: Path, meta: dict) -> Image:
        first = bin_path.read_bytes()
        segs = [(0, first)]
        for s in meta.get("image", {}).get("segments", [])[1:]:
            segs.append((s["offset"], base64.b64decode(s["data_b64"])))
        return cls(segs, meta.get("image", {}).get("size", len(first)), meta.get("image", {}).get("snapshot"))


def compress(fmt: int, data: bytes) -> bytes:
    if fmt == 1:
        return gzip.compress(data, compresslevel=1, mtime=0)
    if fmt == 2:
        return bz2.compress(data, 1)
    if fmt == 3:
        return lzma.compress(data, preset=0)
    if fmt == 5:
        return zstandard.ZstdCompressor(level=1).compress(data)
    raise ValueError(fmt)


@functools.cache
def _zeros_frame(fmt: int, mib: int) -> bytes:
    return compress(fmt, bytes(mib << 20))


def assemble(case: Case) -> Image:
    prefix = bytes(case.prefix.buf) if case.prefix is not None else b""
    stream = bytes(case.stream.buf)
    if case.compress is not None:
        body = bytearray(compress(case.compress, stream))
        for edit in case.post:
            if edit[0] == "flip" and body:
                body[int(edit[1] * len(body)) % len(body)] ^= 1 << edit[2]
            elif edit[0] == "cut":
                del body[int(edit[1] * len(body)):]
            elif edit[0] == "append":
                body += edit[1]
            elif edit[0] == "again":
                body += compress(case.compress, stream)
            elif edit[0] == "zeros":  # a second frame/member holding that many MiB of zeros
                body += _zeros_frame(case.compress, edit[1])
        first = prefix + bytes(body)
        return Image([(0, first)], len(first) + case.extend, case.snapshot)
    first = prefix + stream
    segs = [(0, first)]
    end = len(first)
    for off, blob in case.far:
        at = len(prefix) + off
        if at >= len(first) and len(blob):
            segs.append((at, bytes(blob.buf)))
            end = max(end, at + len(blob))
    return Image(segs, end + case.extend, case.snapshot)


def write_image(path: str, img: Image) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off, data in img.segments:
            if data:
                os.pwrite(fd, data, off)
        os.ftruncate(fd, img.size)
    finally:
        os.close(fd)


# --- judging ------------------------------------------------------------------------------------

@dataclass
class Failure:
    kind: str  # exception | empty-message | internal | slow | memory | mismatch | fd-leak | rejects-valid
    step: str
    message: str
    detail: str = ""  # a traceback, or where the time or memory went
    hot: str = ""  # slow: the function that took the time; memory: the step's top allocation site

    @property
    def signature(self) -> str:
        """What makes two failures the same bug, for dedup and for the known-bug list."""
        if self.kind in ("exception", "internal"):
            return f"{self.kind}|{self.message.split(':')[0]}|{_where(self.detail)}"
        if self.kind in ("slow", "memory"):
            return f"{self.kind}|{self.hot}" if self.hot else f"{self.kind}|{self.step}"
        return f"{self.kind}|{self.step}|{template(self.message)}"


@dataclass
class Result:
    outcome: str  # a coarse summary of what ramfs said, for the corpus's novelty test
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: dict = field(default_factory=dict)
    step_peak: dict = field(default_factory=dict)  # tracemalloc peak per step (traced cases)
    step_rss: dict = field(default_factory=dict)  # resident growth per step
    hung: str = ""  # the step the CPU watchdog stopped

    @property
    def peak(self) -> int:
        return max(self.step_peak.values(), default=0)

    @property
    def rss_growth(self) -> int:
        return max(self.step_rss.values(), default=0)


class Hang(BaseException):
    pass


def _on_prof(signum, frame):
    raise Hang(f"case still running after {HANG_CPU_S} s of CPU")


_NUM = re.compile(r"0x[0-9a-fA-F]+|\d+")
_STR = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"")


def template(msg: str) -> str:
    """A message with its numbers and quoted names taken out: what kind of thing it says."""
    msg = msg.split(" (at offset")[0]
    return _NUM.sub("N", _STR.sub("S", msg))[:160]


def _where(tb: str) -> str:
    """The innermost ramfs frame of a traceback text."""
    frames = re.findall(r'File "([^"]*ramfs/[^"]*)", line (\d+), in (\w+)', tb)
    if not frames:
        return ""
    f, _, fn = frames[-1]
    return f"{Path(f).name}:{fn}"


@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    import ast
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.lineno, node.end_lineno or node.lineno, node.name))
    return out


def _func_at(filename: str, lineno: int) -> str:
    """``file.py:function`` for a line (stable across edits elsewhere, unlike line numbers)."""
    inner = [(a, name) for a, z, name in _functions(filename) if a <= lineno <= z]
    name = max(inner)[1] if inner else f"{lineno}"
    return f"{Path(filename).name}:{name}"


def _read_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Step(Exception):
    """A step's own failure (mismatch, bad error message), raised to end that step."""

    def __init__(self, failure: Failure):
        self.failure = failure


class Runner:
    """Runs cases in a private tmpfs directory; one instance per fuzzing run."""

    def __init__(self, workdir: str | None = None):
        base = workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.dir = Path(tempfile.mkdtemp(prefix="ramfs-fuzz-", dir=base))
        self.path = str(self.dir / "case.img")
        self.cache = self.dir / "cache"
        self.hwm = _reset_hwm()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one case ------------------------------------------------------------------------
    def run(self, img: Image, *, trace: bool, deep: bool, read_seed: int, steps: set[str] | None = None,
            quick: bool = False) -> Result:
        """Judge one image; ``steps`` limits the work to those steps (for the minimizer).

        ``quick`` reports a slow or big step at once, without confirming it by re-running or
        finding where the time or memory went (enough to see that a known bug is still there).
        """
        res = self._run_once(img, trace=trace, deep=deep, read_seed=read_seed, steps=steps)
        slow = [s for s, t in res.step_seconds.items() if t > TIME_LIMIT]
        if slow and quick:
            # One untraced re-run of the slow steps (tracemalloc alone can double a step's time).
            only = set(slow) | ({"open"} if "cached" in slow else set())
            again = self._run_once(img, trace=False, deep=deep, read_seed=read_seed, steps=only)
            res.failures += [Failure("slow", s, f"{s} took {again.step_seconds[s]:.2f} s")
                             for s in slow if again.step_seconds.get(s, 0) > TIME_LIMIT]
        elif slow:
            # Confirm on an untraced re-run (tracemalloc and a loaded machine slow things).
            best = dict(res.step_seconds)
            only = set(slow) | ({"open"} if "cached" in slow else set())
            for _ in range(2):
                again = self._run_once(img, trace=False, deep=deep, read_seed=read_seed, steps=only)
                for s, t in again.step_seconds.items():
                    best[s] = min(best.get(s, t), t)
                if all(best.get(s, 0) <= TIME_LIMIT for s in slow):
                    break
            for s in slow:
                if best.get(s, 0) > TIME_LIMIT:
                    hot, detail, t = self._profile(img, deep, read_seed, s)
                    if t <= TIME_LIMIT:
                        continue  # fast a fourth time, even under cProfile: the machine was busy
                    stopped = f" (stopped by the watchdog at {HANG_CPU_S} s of CPU)" if s == res.hung else ""
                    res.failures.append(Failure("slow", s, f"{s} took {best[s]:.2f} s (limit {TIME_LIMIT} s)"
                                                + stopped, detail, hot))
        big = [s for s in res.step_peak if res.step_peak[s] > MEM_LIMIT]
        big += [s for s in res.step_rss if res.step_rss[s] > RSS_LIMIT and s not in big]
        for s in big:
            hot, detail = self._allocations(img, deep, read_seed, s) if not quick else ("", "")
            howmuch = (f"tracemalloc peak {res.step_peak[s] >> 20} MiB (limit {MEM_LIMIT >> 20} MiB)"
                       if res.step_peak.get(s, 0) > MEM_LIMIT else
                       f"resident size grew by {res.step_rss[s] >> 20} MiB (limit {RSS_LIMIT >> 20} MiB)")
            res.failures.append(Failure("memory", s, f"{s}: {howmuch}", detail, hot))
        return res

    def _profile(self, img: Image, deep: bool, read_seed: int, step: str) -> tuple[str, str, float]:
        """The function (not a builtin) with the most own time when ``step`` runs again, and
        how long the step took then."""
        import cProfile
        import pstats
        prof = cProfile.Profile()
        res = prof.runcall(self._run_once, img, trace=False, deep=deep, read_seed=read_seed,
                           steps={step} | ({"open"} if step == "cached" else set()))
        st = pstats.Stats(prof)
        took = res.step_seconds.get(step, 0.0)

        def name(key) -> str:
            f, _, fn = key
            if f != "~":
                return f"{Path(f).name}:{fn}"
            # A builtin (pread, a regex search...): name it after its costliest caller too.
            callers = st.stats[key][4]
            by = max(callers, key=lambda c: callers[c][2], default=None)
            short = fn.strip("<>").replace("built-in method ", "").replace("method ", "")
            return f"{name(by)}>{short}" if by and by[0] != "~" else short

        rows = sorted(((v[2], k) for k, v in st.stats.items()
                       if "/tests/fuzz/" not in k[0] and "_lsprof" not in k[2]), reverse=True)
        if not rows:
            return "", "", took
        top = [f"{name(k)} {t:.2f}s" for t, k in rows[:5]]
        return name(rows[0][1]), "own time: " + ", ".join(top), took

    def _allocations(self, img: Image, deep: bool, read_seed: int, step: str) -> tuple[str, str]:
        """Where the memory of ``step`` goes: the allocation sites alive at its peak.

        tracemalloc keeps no snapshot of the peak, so the step runs again under a profile
        hook that, at each function return (Python or C), takes a snapshot when more memory
        is traced than ever before. The innermost ramfs function of the biggest site is the
        failure's signature.
        """
        best: list = [MEM_LIMIT // 2, None]

        def hook(frame, event, arg):
            if event in ("return", "c_return"):
                cur = tracemalloc.get_traced_memory()[0]
                if cur > best[0] * 1.1:
                    best[0], best[1] = cur, tracemalloc.take_snapshot()

        tracemalloc.start(16)
        sys.setprofile(hook)
        try:
            self._run_once(img, trace=False, deep=deep, read_seed=read_seed,
                           steps={step} | ({"open"} if step == "cached" else set()))
        finally:
            sys.setprofile(None)
            tracemalloc.stop()
        if best[1] is None:
            return "", ""
        stats = [x for x in best[1].statistics("traceback") if x.size > 1 << 20][:4]
        lines = []
        hot = ""
        for x in stats:
            frames = [fr for fr in x.traceback if "/ramfs/" in fr.filename]
            where = " <- ".join(_func_at(fr.filename, fr.lineno) for fr in reversed(frames[-4:]))
            lines.append(f"{x.size >> 20} MiB at {where or x.traceback[-1]}")
            if not hot and frames:
                hot = "<".join(_func_at(fr.filename, fr.lineno) for fr in reversed(frames[-2:]))
        return hot, f"{best[0] >> 20} MiB traced at the peak; largest sites: " + "; ".join(lines)

    def _run_once(self, img: Image, *, trace: bool, deep: bool, read_seed: int, steps=None) -> Result:
        write_image(self.path, img)
        if self.cache.exists():
            shutil.rmtree(self.cache)
        fds = _fd_count()
        res = Result(outcome="")
        self._snapshot = img.snapshot
        self._trace = trace and not tracemalloc.is_tracing()
        if self._trace:
            tracemalloc.start()
        self._current = "case"
        old = signal.signal(signal.SIGPROF, _on_prof)
        signal.setitimer(signal.ITIMER_PROF, HANG_CPU_S)
        t0 = time.perf_counter()
        try:
            self._exercise(res, deep, read_seed, steps)
        except Hang:
            # The step's time is over the limit: it is reported (and profiled) as slow.
            res.hung = self._current
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, old)
            res.seconds = time.perf_counter() - t0
            if self._trace:
                tracemalloc.stop()
        if self.cache.exists():
            shutil.rmtree(self.cache)
        if _fd_count() != fds:
            res.failures.append(Failure("fd-leak", "case", f"{_fd_count() - fds} file descriptor(s) left open"))
        return res

    def _step(self, res: Result, name: str, fn):
        self._current = name
        rss0 = _read_status()["VmRSS"] if self.hwm and _reset_hwm() else None
        if self._trace:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            return fn()
        except _Step as s:
            res.failures.append(s.failure)
        except (Hang, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001 - anything that is not a RamfsError is a finding
            if isinstance(e, SystemExit) and name.startswith("cli"):
                res.failures.append(Failure("exception", name, f"SystemExit({e.code})", traceback.format_exc()))
            else:
                res.failures.append(Failure("exception", name, f"{type(e).__name__}: {e}"[:500],
                                            traceback.format_exc()))
        finally:
            res.step_seconds[name] = res.step_seconds.get(name, 0.0) + time.perf_counter() - t0
            if self._trace:
                res.step_peak[name] = tracemalloc.get_traced_memory()[1] - base
            if rss0 is not None:
                res.step_rss[name] = _read_status()["VmHWM"] - rss0
        return None

    def _ramfs_error(self, step: str, e: RamfsError) -> str:
        msg = str(e)
        if not msg.strip():
            raise _Step(Failure("empty-message", step, f"{type(e).__name__} with an empty message"))
        if msg.startswith("internal") or ": internal" in msg:
            raise _Step(Failure("internal", step, f"{type(e).__name__}: {msg}", traceback.format_exc()))
        return f"E:{type(e).__name__}:{template(msg)}"

    def _exercise(self, res: Result, deep: bool, read_seed: int, steps=None) -> None:
        path = self.path
        snap = self._snapshot
        want = (lambda s: True) if steps is None else (lambda s: s in steps)
        notes: list[str] = []
        compressed = _compressed_format(path)
        refused: list[str] = []  # the error type of the first open, if it failed

        def plain():
            try:
                with open_image(path, use_cache=False, snapshot=snap) as img:
                    reads = self._reads(img, read_seed)
                    facts = describe(img)
                    json.dumps(facts)
                    notes.append(f"open:{img.encoding}:{img.container}:{len(img.blocks)}")
                    notes.extend(sorted({"w:" + template(w) for w in facts["warnings"]}))
                    return reads
            except RamfsError as e:
                notes.append(self._ramfs_error("open", e))
                refused.append(type(e).__name__)
                return None

        reads = self._step(res, "open", plain) if want("open") else None

        if snap is not None and want("qcow2"):
            self._step(res, "qcow2", lambda: self._qcow2(path, snap, reads, refused, read_seed, notes))

        def devices():
            # The device state decoded by the VM description (vmstate.py), the CPUs taken from
            # it (core.elf notes), and the guest-physical map with a few reads through it.
            from ramfs.format.vmstate import cpu_states, parse_devices
            from ramfs.views.export import SequentialExport
            from ramfs.views.elfcore import ElfCore, cpus_of
            from ramfs.image.phys import phys_map
            from ramfs.views.phys import PhysView
            try:
                with open_image(path, use_cache=False, snapshot=snap) as img:
                    try:
                        ds = parse_devices(img.data, img.layout)
                        json.dumps(ds.to_dict())
                        cpu_states(ds)
                        notes.append(f"devices:{len(ds)}")
                    except RamfsError as e:
                        notes.append("dev" + self._ramfs_error("devices", e))
                    cpus_of(img)
                    pmap = phys_map(img)
                    json.dumps(pmap.as_json())
                    view = PhysView(img, pmap)
                    rng = random.Random(read_seed)
                    for _ in range(4):
                        gpa = rng.randrange(0, max(1, pmap.size + 4096))
                        size = rng.choice([1, 4096, 65536])
                        data = view.read(gpa, size)
                        if len(data) > size:
                            raise _Step(Failure("mismatch", "devices", f"PhysView.read({gpa:#x}, {size}) "
                                                                       f"returned {len(data)} bytes"))
                        view.has_data(gpa, size)
                    for i, _ in enumerate(view.populated_ranges()):
                        if i >= 4096:
                            break
                    # The lazily built views a mount serves: export/sequential.img and core.elf.
                    for name, build in (("export", lambda: SequentialExport(img)),
                                        ("core", lambda: ElfCore(view, cpus_of(img)))):
                        try:
                            lazy = build()
                        except RamfsError as e:
                            notes.append(name + self._ramfs_error(name, e))
                            continue
                        for _ in range(4):
                            off = rng.randrange(0, lazy.size + 4096)
                            size = rng.choice([1, 4104, 65536])
                            data = lazy.read(off, size)
                            if len(data) != max(0, min(size, lazy.size - off)):
                                raise _Step(Failure("mismatch", "devices", f"{name}.read({off:#x}, {size}) "
                                                                           f"returned {len(data)} bytes"))
            except RamfsError:
                pass  # the open step judges the open itself

        if want("devices") and (reads is not None or steps is not None):
            self._step(res, "devices", devices)

        def checked():
            problems = check(path, snapshot=snap)
            if not isinstance(problems, list) or not all(isinstance(p, str) and p.strip() for p in problems):
                raise _Step(Failure("empty-message", "check", f"check returned {problems!r:.200}"))
            for p in problems:
                if p.startswith("internal") or ": internal" in p:
                    raise _Step(Failure("internal", "check", p))
            notes.append(f"check:{len(problems)}")

        if want("check"):
            self._step(res, "check", checked)

        if want("cached") and (compressed or (deep and (reads is not None or steps is not None))):
            def cached():
                try:
                    with open_image(path, cache=self.cache, snapshot=snap) as img:
                        first = self._reads(img, read_seed)
                        describe(img)
                        if compressed:  # the device state, from the decompressed stream
                            from ramfs.format.vmstate import parse_devices
                            try:
                                json.dumps(parse_devices(img.data, img.layout).to_dict())
                            except RamfsError as e:
                                self._ramfs_error("cached", e)
                    del img  # what ramfs holds, not what the harness keeps, is measured
                    with open_image(path, cache=self.cache, snapshot=snap) as img:
                        second = self._reads(img, read_seed)
                        from_cache = img.index_from_cache
                    del img
                except RamfsError as e:
                    notes.append("cache" + self._ramfs_error("cached", e))
                    return
                notes.append(f"cached:{from_cache}")
                if first != second:
                    raise _Step(Failure("mismatch", "cached", "a second open (from the cache) reads other bytes: "
                                        + _diff(first, second)))
                if reads is not None and first != reads:
                    raise _Step(Failure("mismatch", "cached", "opening with the cache reads other bytes than "
                                        "without: " + _diff(reads, first)))

            self._step(res, "cached", cached)

        if deep:
            for argv in (["info", path], ["info", "--json", path], ["check", path]):
                name = "cli-" + "-".join(a for a in argv[:-1]).replace("--", "")
                if snap is not None:
                    argv = [*argv[:-1], "--snapshot", snap, path]
                if want(name):
                    self._step(res, name, lambda argv=argv, name=name: self._cli(argv, name))
        res.outcome = "|".join(notes)

    def _qcow2(self, path: str, snap: str, reads: list | None, refused: list[str], read_seed: int,
               notes: list[str]) -> None:
        """A qcow2 disk, as users meet it and read two ways.

        The listing a mount makes (``snapshots_with_state``) and a plain open (refused, naming
        the snapshots); then the snapshot's VM state through ramfs's cluster map against
        :func:`fuzz.qcow2.read_vmstate` (QEMU's rules, written apart): where ramfs builds a map,
        QEMU must not call the file corrupt, the bytes must be the same, and what
        ``data_ranges`` leaves out must be zeros; that stream written as a plain file must
        open and read exactly as the snapshot did (or fail the same way).
        """
        from fuzz.qcow2 import Refused, read_vmstate
        from ramfs.image.files import FileSource
        from ramfs.image.qcow2 import VmstateSource, snapshots_with_state
        try:
            names = [s.name for s in snapshots_with_state(path)]
            notes.append(f"snaps:{len(names)}")
        except RamfsError as e:
            notes.append("snaps" + self._ramfs_error("qcow2", e))
        try:
            with open_image(path, use_cache=False):
                pass
            raise _Step(Failure("mismatch", "qcow2", "a qcow2 disk opened without --snapshot"))
        except RamfsError as e:
            self._ramfs_error("qcow2", e)
        try:
            src = VmstateSource(FileSource(path), snap)
        except RamfsError as e:
            notes.append("map" + self._ramfs_error("qcow2", e))
            return
        with src:
            try:
                ref = read_vmstate(path, snap)
            except Refused as e:
                if e.corrupt:
                    raise _Step(Failure("mismatch", "qcow2",
                                        f"ramfs maps a VM state that QEMU calls corrupt: {e}")) from None
                return
            try:
                got = src.read_at(0, src.size)
            except RamfsError as e:
                raise _Step(Failure("mismatch", "qcow2", f"the cluster map was built, then reading the VM state "
                                                         f"failed: {type(e).__name__}: {e}")) from None
            if got != ref:
                at = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
                raise _Step(Failure("mismatch", "qcow2", f"the VM state read through the cluster map differs from "
                                                         f"QEMU's reading at {at:#x} ({len(got)} vs {len(ref)} bytes)"))
            pos = 0
            for a, z in [*src.data_ranges(0, src.size), (src.size, src.size)]:
                if ref[pos:a].count(0) != a - pos:
                    raise _Step(Failure("mismatch", "qcow2", f"data_ranges leaves out [{pos:#x}, {a:#x}), "
                                                             "which holds data"))
                pos = z
        plain = str(self.dir / "plain.img")
        with open(plain, "wb") as f:
            f.write(ref)
        try:
            with open_image(plain, use_cache=False) as img:
                again = self._reads(img, read_seed)
        except RamfsError as e:
            again = None
            if not refused:
                raise _Step(Failure("mismatch", "qcow2", f"the snapshot opens, its VM state as a plain file does not: "
                                                         f"{type(e).__name__}: {e}")) from None
            if type(e).__name__ != refused[0] and refused[0] != "ImageIOError":
                raise _Step(Failure("mismatch", "qcow2", f"the snapshot is refused with {refused[0]}, its VM state "
                                                         f"as a plain file with {type(e).__name__}: {e}")) from None
        finally:
            os.unlink(plain)
        if again is not None and refused:
            raise _Step(Failure("mismatch", "qcow2", f"the snapshot is refused ({refused[0]}), its VM state as a "
                                                     "plain file opens"))
        if again is not None and reads is not None and again != reads:
            raise _Step(Failure("mismatch", "qcow2", "the snapshot and its VM state as a plain file read other "
                                                     "bytes: " + _diff(reads, again)))

    def _cli(self, argv: list[str], step: str) -> None:
        from ramfs import cli
        out, err = io.BytesIO(), io.BytesIO()
        saved = (sys.stdout, sys.stderr, signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP),
                 os.environ.get("RAMFS_CACHE_DIR"))
        w_out = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
        w_err = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
        sys.stdout, sys.stderr = w_out, w_err
        os.environ["RAMFS_CACHE_DIR"] = str(self.cache)
        try:
            rc = cli.main(argv)
        finally:
            sys.stdout, sys.stderr = saved[0], saved[1]
            for w in (w_out, w_err):
                try:
                    w.flush()
                except ValueError:
                    pass
                w.detach()
            signal.signal(signal.SIGTERM, saved[2])
            signal.signal(signal.SIGHUP, saved[3])
            if saved[4] is None:
                os.environ.pop("RAMFS_CACHE_DIR", None)
            else:
                os.environ["RAMFS_CACHE_DIR"] = saved[4]
        if rc not in (0, 1, 2):
            raise _Step(Failure("exception", step, f"exit code {rc!r}"))
        if rc == 2 and not err.getvalue().strip():
            raise _Step(Failure("empty-message", step, "exit code 2 with nothing on stderr"))

    # -- reads -----------------------------------------------------------------------------
    def _reads(self, img, seed: int) -> list:
        rng = random.Random(seed)
        out = []
        for bi, b in enumerate(img.blocks):
            used = b.used_length
            ps = b.page_size
            ranges = [(0, min(used, 64 << 10)), (max(0, used - ps - 3), 2 * ps), (used, 10), (used - 1, 1),
                      (used + 12345, 1 << 20), (0, 0)]
            for _ in range(4):
                off = rng.randrange(0, used) if used else 0
                ranges.append((off, rng.choice([1, 8, ps - 1, ps, ps + 1, 3 * ps + 5, 256 << 10])))
            # As maps/ lists them: up to 65536 ranges (hashed, to hold nothing), which costs a
            # linear implementation ~0.1 s; more would measure the output's size, not ramfs.
            pops = []
            h = hashlib.sha1()
            n = 0
            for a, z in b.populated_ranges():
                if n < 3:
                    pops.append((a, z))
                h.update(struct.pack("<QQ", a, z))
                n += 1
                if n >= 1 << 16:
                    break
            for a, z in pops[:3]:
                ranges.append((a, min(z - a, 1 << 20)))
                ranges.append((max(0, a - 7), 14))
            for off, size in ranges:
                data = img.read(b if rng.random() < 0.8 else b.idstr, off, size)
                want = max(0, min(off + size, used) - off)
                if len(data) != want:
                    raise _Step(Failure("mismatch", "read", f"read({b.idstr!r}, {off:#x}, {size:#x}) returned "
                                                            f"{len(data)} bytes, expected {want}"))
                out.append((bi, off, size, hashlib.sha1(data).hexdigest()[:16]))
            for _ in range(3):
                off = rng.randrange(0, used) if used else 0
                out.append((bi, "has", off, b.has_data(off, rng.choice([1, ps, 1 << 30]))))
            out.append((bi, "pops", h.hexdigest()[:16], n, b.populated_pages))
        return out


def _diff(a: list, b: list) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} != {y}"
    return f"{len(a)} items != {len(b)} items"


def _compressed_format(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(36)
    if head[:16] not in (b"LibvirtQemudSave", b"LibvirtQemudPart") or len(head) < 32:
        return False
    for order in ("<", ">"):
        version, _, _, fmt = struct.unpack_from(order + "4I", head, 16)
        if version <= 2:
            return version == 2 and 1 <= fmt <= 5
    return False


# --- regressions --------------------------------------------------------------------------------

def _repo_relative(line: str) -> str:
    """A traceback line with the repository's path taken out (regressions are committed: they
    say where in ramfs, not where on the machine that found them)."""
    line = line.replace(str(Path(__file__).resolve().parents[2]) + os.sep, "")
    return re.sub(r'"/[^"]*/lib/python3\.\d+/', '"<python>/', line)


def save_failure(out_dir: Path, img: Image, failure: Failure, meta: dict) -> Path:
    """``<sha>.bin`` (the file's first segment) and ``<sha>.json`` (what failed, how it was found,
    the rest of the file). An image that fails several ways lists each failure once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = img.sha()[:16]
    p = out_dir / f"{sha}.bin"
    j = p.with_suffix(".json")
    p.write_bytes(img.dense)
    entry = {"kind": failure.kind, "step": failure.step, "error": failure.message,
             "signature": failure.signature,
             "traceback": [_repo_relative(line) for line in failure.detail.splitlines()[-12:]]}
    info = json.loads(j.read_text()) if j.exists() else {"status": "open", "failures": []}
    if all(f["signature"] != failure.signature for f in info["failures"]):
        info["failures"].append(entry)
    info.update({"image": img.to_json(), **meta})
    j.write_text(json.dumps(info, indent=1) + "\n")
    return p


def load_regressions(d: Path = REGRESSIONS) -> list[tuple[str, Image, dict]]:
    out = []
    for j in sorted(d.glob("*.json")):
        meta = json.loads(j.read_text())
        out.append((j.stem, Image.load(j.with_suffix(".bin"), meta), meta))
    return out


def replay(runner: Runner, img: Image, meta: dict, *, quick: bool = False) -> Result:
    """A saved case, with every check on (tracemalloc and the deep steps).

    An ``"expect": "opens"`` regression (a valid image ramfs rejected) must also open.
    """
    res = runner.run(img, trace=True, deep=True, read_seed=meta.get("read_seed", 0), quick=quick)
    if meta.get("expect") == "opens":
        write_image(runner.path, img)
        try:
            with open_image(runner.path, use_cache=False, snapshot=img.snapshot) as opened:
                if not opened.blocks:
                    res.failures.append(Failure("rejects-valid", "open", "opens with no RAM block"))
        except RamfsError as e:
            res.failures.append(Failure("rejects-valid", "open", f"{type(e).__name__}: {e}"))
    return res


def minimize(runner: Runner, img: Image, failure: Failure, *, budget_s: float = 60.0) -> Image:
    """Shrink a one-segment failing image while the same failure signature reproduces.

    Only the failing step runs (with ``open`` before ``cached``, which compares with it).
    Cuts the end first (binary search), then deletes ever smaller chunks (ddmin-like); the
    aim is a readable reproducer, not the shortest one.
    """
    if len(img.segments) != 1 or img.size != len(img.dense):
        return img
    signature = failure.signature
    steps = None if failure.step == "case" else {failure.step} | ({"open"} if failure.step == "cached" else set())
    data = img.dense
    deadline = time.monotonic() + budget_s

    def fails(d: bytes) -> bool:
        r = runner.run(Image([(0, d)], len(d), img.snapshot), trace=False, deep=True, read_seed=0, steps=steps)
        return any(f.signature == signature for f in r.failures)

    if not fails(data):
        return img
    if img.snapshot is not None:
        return _sparse(_zero_out(fails, data, deadline), img.snapshot)
    lo, hi = 0, len(data)  # the shortest failing prefix lies in (lo, hi]
    while hi - lo > 1 and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        if fails(data[:mid]):
            hi = mid
        else:
            lo = mid
    data = data[:hi]
    chunk = max(1, len(data) // 4)
    while chunk >= 1 and time.monotonic() < deadline:
        i = 0
        while i < len(data) and time.monotonic() < deadline:
            cand = data[:i] + data[i + chunk:]
            if cand and fails(cand):
                data = cand
            else:
                i += chunk
        chunk //= 2
    return Image([(0, data)], len(data), img.snapshot)


def _zero_out(fails, data: bytes, deadline: float) -> bytes:
    """A qcow2 file's bytes zeroed chunk by chunk (halving down to 64 bytes) while it still fails:
    deleting bytes would move every cluster, zeroing keeps the offsets that matter."""
    buf = bytearray(data)
    chunk = 1 << 16
    while chunk >= 64 and time.monotonic() < deadline:
        for i in range(0, len(buf), chunk):
            if time.monotonic() >= deadline:
                break
            piece = buf[i:i + chunk]
            if piece.count(0) == len(piece):
                continue
            cand = bytearray(buf)
            cand[i:i + chunk] = bytes(len(piece))
            if fails(bytes(cand)):
                buf = cand
        chunk //= 4
    return bytes(buf)


def _sparse(data: bytes, snapshot: str | None) -> Image:
    """``data`` as segments of non-zero bytes over holes (a zeroed-out qcow2 file is mostly holes;
    the first segment goes to the ``.bin``, the others into the ``.json``)."""
    runs: list[list[int]] = [[0, 0]]
    for m in re.finditer(rb"[^\x00]+", data):
        if m.start() - runs[-1][1] < 512:
            runs[-1][1] = m.end()
        else:
            runs.append([m.start(), m.end()])
    return Image([(a, data[a:z]) for a, z in runs], len(data), snapshot)


# --- the loop -------------------------------------------------------------------------------------

def verify_seeds(seeds: list[Case], runner: Runner) -> None:
    """Every seed must open (or, compressed, open through the cache) without error."""
    for c in seeds:
        img = assemble(c)
        write_image(runner.path, img)
        kw = {"cache": runner.cache} if c.compress else {"use_cache": False}
        kw["snapshot"] = c.snapshot
        try:
            with open_image(runner.path, **kw) as opened:
                assert opened.blocks, c.name
        except RamfsError as e:
            if not c.known_bug:
                raise AssertionError(f"seed {c.name} does not open: {e}") from None
        else:
            if c.known_bug:
                raise AssertionError(f"seed {c.name} opens now: {c.known_bug} is fixed; drop known_bug")
        finally:
            if runner.cache.exists():
                shutil.rmtree(runner.cache)


@dataclass
class Stats:
    cases: int = 0
    failures: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    slowest_case: str = ""
    peak: int = 0
    rss: int = 0
    outcomes: int = 0
    corpus: int = 0
    by_signature: dict = field(default_factory=dict)  # new failures: signature -> count
    known: dict = field(default_factory=dict)  # failures of open, already saved bugs
    saved: list = field(default_factory=list)


def _cheap(case: Case, img: Image) -> bool:
    """Whether a case may join the corpus. Expensive ones (huge sparse blocks, long holes,
    decompression bombs) would make all their descendants expensive. Decided from the
    input, not from a measured time, so that a run stays deterministic on a loaded machine."""
    return (not case.far and case.extend <= 1 << 20 and img.size <= 8 << 20
            and all(e[1] <= 1 for e in case.post if e[0] == "zeros"))


def known_signatures(d: Path = REGRESSIONS) -> set[str]:
    """Failure signatures of the saved regressions whose bug is still open."""
    out = set()
    for _, _, meta in load_regressions(d):
        if meta.get("status") == "open":
            out.update(f["signature"] for f in meta.get("failures", []))
    return out


def fuzz(cases: int, seed: int, *, out_dir: Path, trace_fraction: float = 0.2, deep_fraction: float = 0.2,
         minimize_failures: bool = True, log=None, progress_every: float = 10.0, corpus_cap: int = 3000,
         max_seconds: float | None = None, known: set[str] = frozenset(), heavy: bool = True,
         only: str | None = None) -> Stats:
    """Mutate the seeds ``cases`` times; failures with a new signature are saved in ``out_dir``.

    Failures whose signature is in ``known`` (open bugs with a saved regression) are counted
    in ``Stats.known`` and not saved again. ``heavy=False``: no mutation that is slow by
    nature (see :func:`fuzz.mutate.mutate`). ``only``: the seeds whose name starts so.
    """
    from fuzz.mutate import mutate
    seeds = [c for c in build_seeds() if only is None or c.name.startswith(only)]
    stats = Stats()
    rng = random.Random(seed)
    with Runner() as runner:
        verify_seeds(seeds, runner)
        corpus: list[Case] = list(seeds)
        seen: set[str] = set()
        t_start = time.monotonic()
        last = t_start
        for i in range(cases):
            if max_seconds is not None and time.monotonic() - t_start > max_seconds:
                break
            parent = rng.choice(seeds) if rng.random() < 0.3 else rng.choice(corpus)
            child = mutate(parent, rng, seeds, heavy)
            img = assemble(child)
            trace = rng.random() < trace_fraction
            deep = rng.random() < deep_fraction
            read_seed = rng.getrandbits(32)
            res = runner.run(img, trace=trace, deep=deep, read_seed=read_seed)
            stats.cases += 1
            stats.seconds += res.seconds
            if res.seconds > stats.slowest:
                stats.slowest, stats.slowest_case = res.seconds, f"case {i} ({' / '.join(child.ops)})"
            stats.peak = max(stats.peak, res.peak)
            stats.rss = max(stats.rss, res.rss_growth)
            if res.outcome not in seen:
                seen.add(res.outcome)
                if not _cheap(child, img):
                    pass  # slow inputs would slow every descendant: keep only cheap ones
                elif len(corpus) < corpus_cap:
                    corpus.append(child)
                else:
                    corpus[len(seeds) + rng.randrange(corpus_cap - len(seeds))] = child
            for f in res.failures:
                sig = f.signature
                if sig in known:
                    stats.known[sig] = stats.known.get(sig, 0) + 1
                    continue
                stats.failures += 1
                n = stats.by_signature.get(sig, 0)
                stats.by_signature[sig] = n + 1
                if n == 0:
                    small = img
                    if minimize_failures and f.kind not in ("slow", "memory"):
                        small = minimize(runner, img, f)
                    meta = {"found_by": {"seed": seed, "case": i, "ops": child.ops}, "read_seed": 0
                            if small is not img else read_seed,
                            "original_size": img.size, "minimized_size": small.size}
                    p = save_failure(out_dir, small, f, meta)
                    stats.saved.append(str(p))
                    if log:
                        log(f"FAILURE case {i}: {f.kind} in {f.step}: {f.message}\n    ops: {child.ops}\n"
                            f"    saved {p} ({small.size} bytes)")
            now = time.monotonic()
            if log and now - last > progress_every:
                last = now
                log(f"{i + 1} cases, {(i + 1) / (now - t_start):.0f}/s, {len(seen)} outcomes, "
                    f"corpus {len(corpus)}, new failures {stats.failures} ({len(stats.by_signature)} kinds), "
                    f"known {sum(stats.known.values())}")
        stats.outcomes = len(seen)
        stats.corpus = len(corpus)
    return stats
