"""The ``ramfs`` command line. Errors print one line and exit non-zero; no tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from ramfs import __version__
from ramfs.errors import RamfsError

if TYPE_CHECKING:
    from ramfs.image import Image
    from ramfs.image.cache import CachePolicy, Entry
    from ramfs.image.phys import Placement
    from ramfs.progress import Progress

EXIT_OK = 0
EXIT_PROBLEMS = 1  # check found problems
EXIT_ERROR = 2  # could not do what was asked

EPILOG = """examples:
  ramfs info /var/lib/libvirt/qemu/save/vm.save
  ramfs info --json vm.save | jq .blocks
  ramfs check vm.save
"""


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _utf8(text: str) -> str:
    """Bytes that are not UTF-8 (kept with surrogateescape) as ``\\xNN``; nothing else changed
    (for JSON, which escapes control characters itself)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Completion of file and directory names (shtab reads an argument's ``complete``; the values
# are shtab.FILE and shtab.DIRECTORY, spelled out so that building the parser never imports it).
COMPLETE_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
COMPLETE_DIR = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}


def _complete(action: argparse.Action, what: dict[str, str]) -> None:
    """How shtab completes the argument (it reads ``action.complete``)."""
    action.complete = what  # type: ignore[attr-defined]  # shtab's addition to argparse.Action


def _show(text: str) -> str:
    """A name or message from an image (or its path) for a terminal, with visible escapes as
    ``ls`` does: bytes that are not UTF-8 (kept with surrogateescape) and C0/DEL/C1 controls as
    ``\\xNN`` (``\\n``, ``\\t``, ``\\r`` by name), bidi and other format characters (Unicode Cf,
    e.g. U+202E), line/paragraph separators and lone surrogates as ``\\uNNNN``, and a backslash
    as ``\\\\``, so that nothing in an image can move the cursor, recolour or reorder the
    output, or pass for another name."""
    if text.isprintable() and "\\" not in text:  # the common case (isprintable is False for all below)
        return text
    import unicodedata

    out = []
    for ch in text:
        o = ord(ch)
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append(f"\\x{o:02x}")
        elif unicodedata.category(ch) in ("Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _scan_bar(quiet: bool = False) -> Progress:
    """A progress bar for opening an image (index build, decompression) on a terminal."""
    from ramfs.progress import Progress

    return Progress(None, "scanning", enabled=False if quiet else None)


def _facts(args: argparse.Namespace, path: str, placement: Placement | None = None) -> dict[str, Any]:
    from ramfs.image import open_image
    from ramfs.image.describe import describe

    bar = _scan_bar(args.quiet)
    try:
        with open_image(path, reads=False, progress=bar.scanned, snapshot=args.snapshot,
                        cache=_cache_policy(args)) as img:
            return describe(img, placement=placement)
    finally:
        bar.done()


def _whole_qcow2_disk(path: str, snapshot: str | None) -> bool:
    """A qcow2 disk named without ``--snapshot``: info and check then take all its snapshots.
    A path that cannot be read is not one; opening it as an image says what is wrong."""
    from ramfs.image.describe import is_qcow2_disk

    if snapshot is not None:
        return False
    try:
        return is_qcow2_disk(path)
    except RamfsError:
        return False


def _info_facts(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """``_facts``, or for a qcow2 disk named without ``--snapshot``, the disk and its snapshots."""
    from ramfs.image.describe import describe_qcow2

    if _whole_qcow2_disk(path, args.snapshot):
        return describe_qcow2(path, _placement(args), cache=_cache_policy(args))
    return _facts(args, path, _placement(args))


def _clock(nsec: int) -> str:
    sec, ns = divmod(nsec, 10**9)
    return f"{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}.{ns // 10**6:03d}"


def _print_qcow2(facts: dict[str, Any]) -> None:
    q = facts["qcow2"]
    snaps = facts["snapshots"]
    with_state = [s for s in snaps if s["vm_state_size"]]
    rows = [("image", facts["path"]),
            ("container", f"qcow2 v{q['version']} ({_size(q['cluster_size'])} clusters"
                          f"{', extended L2' if q['extended_l2'] else ''})"),
            ("disk size", _size(q["virtual_size"])),
            ("snapshots", f"{len(snaps)}, {len(with_state)} with VM state")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {_show(v)}")
    if not snaps:
        return
    table = [("ID", "NAME", "DATE (UTC)", "VM CLOCK", "VM STATE", "DISK SIZE")]
    for s in snaps:
        table.append((_show(s["id"]), _show(s["name"]), s["date"].replace("T", " ").rstrip("Z"),
                      _clock(s["vm_clock_nsec"]), _size(s["vm_state_size"]) if s["vm_state_size"] else "-",
                      _size(s["disk_size"]) if s["disk_size"] is not None else "-"))
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    print()
    for r in table:
        print("  ".join(c.ljust(widths[i]) if i < 4 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
    for s in with_state:
        print()
        print(f"snapshot {_show(s['name'])} (id {_show(s['id'])}; --snapshot {_show(s['name'])}):")
        if s["image"] is not None:
            _print_info(s["image"])
        else:
            print(f"error: {_show(s['error'])}")


def cmd_info(args: argparse.Namespace) -> int:
    if args.jsonl:
        # One line per image, errors included, so that a loop over a directory of saves can
        # be piped to jq without stopping at the first bad one.
        status = EXIT_OK
        for path in args.image:
            try:
                line = _info_facts(args, path)
            except RamfsError as e:
                line = {"path": path, "error": _utf8(str(e))}
                status = EXIT_ERROR
            sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        return status
    status = EXIT_OK
    for n, path in enumerate(args.image):
        if n and not args.json:
            print()
        try:
            facts = _info_facts(args, path)
        except RamfsError as e:
            if len(args.image) == 1:
                raise
            print(f"ramfs: error: {_show(path)}: {_show(str(e))}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        if args.json:
            json.dump(facts, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif facts["container"] == "qcow2":
            _print_qcow2(facts)
        else:
            _print_info(facts)
    return status


def _print_info(facts: dict[str, Any]) -> None:
    lv = facts["libvirt"]
    rows = [
        ("image", facts["path"]),
        ("container", facts["container"] + (f" (libvirt header v{lv['version']})" if lv else "")),
        ("format", facts["format"] + ("" if not lv else f" (code {lv['format_code']})")),
        ("encoding", facts["encoding"]),
    ]
    snap = facts["qcow2_snapshot"]
    if snap:
        rows.append(("snapshot", f"{snap['name']} (id {snap['id']}), taken {snap['date'].replace('T', ' ')}"))
    if lv:
        dom = lv["domain"] or {}
        rows += [("domain", f"{dom.get('name')} ({dom.get('uuid')})"),
                 ("was running", "yes" if lv["was_running"] else "no"),
                 ("complete", "yes" if lv["complete"] else "NO (LibvirtQemudPart)")]
    rows += [
        ("machine", facts["machine"] or "-"),
        ("capabilities", ", ".join(facts["capabilities"]) or "-"),
        ("page size", str(facts["page_size"])),
        ("RAM total", _size(facts["ram_total"])),
        ("devices", str(len(facts["devices"])) if facts["devices"] is not None else "- (no vmdesc)"),
    ]
    for it in facts["stream"]["iterables"]:
        rows.append(("section", f"{it['idstr']} ({it['pieces']} pieces, {_size(it['bytes'])}; kept, not decoded)"))
    if facts["stream"]["padding"]:
        rows.append(("after stream", f"{facts['stream']['padding']} bytes of zeros (padding, ignored)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {_show(v)}")
    print()
    bw = max([len(_show(b["idstr"])) for b in facts["blocks"]] + [5])
    print(f"{'block':<{bw}}  {'size':>10}  {'populated':>10}  {'pages':>9}")
    for b in facts["blocks"]:
        print(f"{_show(b['idstr']):<{bw}}  {_size(b['used_length']):>10}  {_size(b['populated_bytes']):>10}  "
              f"{b['populated_pages']:>9}")
    for wmsg in facts["warnings"]:
        print(f"warning: {_show(wmsg)}")


def cmd_ls(args: argparse.Namespace) -> int:
    """The RAM blocks, one line each like ``ls -l``: size, the bytes that hold data (the
    rest reads as zeros), and the block's idstr (``ram/`` of a mount shows them as files)."""
    facts = _facts(args, args.image)
    rows = []
    for b in facts["blocks"]:
        size, used = b["used_length"], b["populated_bytes"]
        pct = f"{100 * used / size:.1f}%" if size else "-"
        fmt = (lambda n: str(n)) if args.bytes else _size
        rows.append((fmt(size), fmt(used), pct, _show(b["idstr"])))
    head = ("SIZE", "POPULATED", "%", "BLOCK")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    print(f"{head[0]:>{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]}")
    for r in rows:
        print(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    return EXIT_OK


def _versions() -> str:
    """ramfs and what it runs on: bug reports need all four."""
    import ctypes
    import platform

    try:
        import pyfuse3
        pyfuse = pyfuse3.__version__
    except ImportError:
        pyfuse = "not installed"
    libfuse = "not found"
    for name in ("libfuse3.so.3", "libfuse3.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            lib.fuse_pkgversion.restype = ctypes.c_char_p
            libfuse = lib.fuse_pkgversion().decode()
        except AttributeError:  # libfuse < 3.? has only the numeric API version
            v = lib.fuse_version()
            libfuse = f"{v // 10}.{v % 10} (API)"
        break
    return (f"ramfs {__version__}\npyfuse3 {pyfuse}\nlibfuse {libfuse}\n"
            f"Python {platform.python_version()} ({sys.executable})\n{_mount_helper_line()}")


# What /bin/sh searches when mount.fuse3 runs "ramfs SOURCE MOUNTPOINT -o OPTS" for
# `mount -t fuse.ramfs` or an fstab line and no PATH is set (dash's default; systemd's is the
# same set of directories): a pipx install under ~/.local/bin is not on it.
MOUNT_HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _mount_helper_line() -> str:
    import shutil

    found = shutil.which("ramfs", path=MOUNT_HELPER_PATH)
    this = shutil.which("ramfs") or sys.argv[0]
    if found is None:
        return (f"mount -t fuse.ramfs: no ramfs on {MOUNT_HELPER_PATH}; fstab lines will fail with "
                f"'ramfs: not found' (ln -s {os.path.realpath(this)} /usr/local/bin/ramfs, or see the README)")
    return f"mount -t fuse.ramfs runs {found}" + ("" if os.path.realpath(found) == os.path.realpath(this) else
                                                  f" (not this one: {this})")


def cmd_check(args: argparse.Namespace) -> int:
    from ramfs.image.describe import check, check_qcow2

    warnings: list[str] = []
    if _whole_qcow2_disk(args.image, args.snapshot):
        problems = check_qcow2(args.image, warnings=warnings, placement=_placement(args))
    else:
        problems = check(args.image, warnings=warnings, placement=_placement(args), snapshot=args.snapshot)
    for w in warnings:
        print(f"{_show(args.image)}: warning: {_show(w)}")
    if not problems:
        print(f"{_show(args.image)}: OK")
        return EXIT_OK
    for p in problems:
        print(f"{_show(args.image)}: {_show(p)}")
    return EXIT_PROBLEMS


def _placement(args: argparse.Namespace, own: dict[str, str | bool] | None = None) -> Placement:
    """--below-4g, --numa and --device (or their -o forms) as a Placement."""
    from ramfs.image.phys import Placement

    own = own or {}
    below = _value(own, "below_4g") or getattr(args, "below_4g", None)
    devices = list(getattr(args, "device", None) or [])
    device = _value(own, "device")
    if device:
        devices.append(device)
    return Placement.parse(_parse_size(below) if below else None,
                           _value(own, "numa") or getattr(args, "numa", None), devices)


def cmd_convert(args: argparse.Namespace) -> int:
    from ramfs.convert import convert_file
    from ramfs.progress import Progress

    if args.jobs < 1:
        raise RamfsError("--jobs must be at least 1")
    total = os.path.getsize(args.src) if os.path.isfile(args.src) and not args.snapshot else None
    bar = Progress(total, "converting", enabled=False if args.quiet else None)
    try:
        r = convert_file(args.src, args.dst, jobs=args.jobs, direct_io=args.direct_io, progress=bar,
                         snapshot=args.snapshot)
    finally:
        bar.done()
    if not args.quiet:
        if r.already_sparse:
            print(f"{_show(args.dst)}: already mapped-ram; stored as it is ({r.size} bytes)")
        else:
            kind = "libvirt sparse, format 6" if r.container == "libvirt" else "bare"
            print(f"{_show(args.dst)}: mapped-ram ({kind}), {sum(r.populated)} populated pages, {r.size} bytes, "
                  f"{r.seconds:.2f} s")
    return EXIT_OK


def _parse_size(text: str) -> int:
    from ramfs.image.cache import parse_size

    return parse_size(text, "e.g. 2G, 3072M")


@contextlib.contextmanager
def _new_file(out: str, bar: Progress) -> Iterator[BinaryIO]:
    """An open file that becomes ``out`` only when complete (:mod:`ramfs.publish`: a 0600
    temporary removed on any failure or signal, fsynced, then linked, so nothing is
    overwritten)."""
    from ramfs.publish import NewFile

    try:
        with NewFile(out) as new, open(new.fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            new.publish()
    except FileExistsError:
        raise RamfsError(f"{out} already exists") from None
    except OSError as e:
        raise RamfsError(f"cannot write {out}: {e.strerror}") from None
    finally:
        bar.done()


def _write_sparse_view(size: int, read: Callable[[int, int], bytes], has_data: Callable[[int, int], bool] | None,
                       out: str, label: str, quiet: bool) -> None:
    """Write a virtual file to ``out`` (new), skipping ranges that read as zeros (holes)."""
    from ramfs.progress import Progress

    bar = Progress(size, label, enabled=False if quiet else None)
    chunk = 1 << 20
    with _new_file(out, bar) as f:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if has_data is None or has_data(off, n):
                f.seek(off)
                f.write(read(off, n))
            bar(off + n)
        f.truncate(size)


def _write_phys_view(args: argparse.Namespace, as_core: bool) -> int:
    from ramfs.image import open_image
    from ramfs.views.elfcore import ElfCore, cpus_of
    from ramfs.views.phys import PhysView

    placement = _placement(args)
    bar = _scan_bar(args.quiet)
    try:
        img = open_image(args.image, direct_io=args.direct_io, progress=bar.scanned, snapshot=args.snapshot,
                         cache=_cache_policy(args))
    finally:
        bar.done()
    with img:
        view = PhysView(img, placement.map(img))
        if not view.map.ranges:
            raise RamfsError(f"{args.image}: no RAM block with a known guest-physical address")
        if as_core:
            core = ElfCore(view, cpus_of(img))
            _write_sparse_view(core.size, core.read, core.has_data, args.out, "core", args.quiet)
        else:
            _write_sparse_view(view.size, view.read, view.has_data, args.out, "phys", args.quiet)
    return EXIT_OK


def _export_formats() -> dict[str, str | None]:
    """``--format`` of export: raw, and libvirt's compressions (virQEMUSaveDataFormat) with
    the program libvirt pipes the stream through (the same table the reader uses)."""
    from ramfs.image.decompress import CODECS

    return {"raw": None, **{fmt.label: codec.program for fmt, codec in CODECS.items()}}


EXPORT_FORMATS = _export_formats()


def cmd_export(args: argparse.Namespace) -> int:
    """The image as a classic sequential save image, optionally compressed like libvirt."""
    import shutil
    import subprocess

    from ramfs.views.export import SequentialExport
    from ramfs.format import encode
    from ramfs.format.libvirt import SaveFormat
    from ramfs.image import open_image
    from ramfs.progress import Progress

    out = args.out
    if os.path.lexists(out):  # before the (long) open; _new_file checks again
        raise RamfsError(f"{out} already exists")
    fmt = SaveFormat[args.format.upper()]
    program = EXPORT_FORMATS[args.format]
    if program is not None and shutil.which(program) is None:
        raise RamfsError(f"--format {args.format} needs the {program} program")
    bar = _scan_bar(args.quiet)
    try:
        img = open_image(args.image, direct_io=args.direct_io, progress=bar.scanned, snapshot=args.snapshot,
                         cache=_cache_policy(args))
    finally:
        bar.done()
    with img:
        if program is not None and img.libvirt is None:
            raise RamfsError(f"--format {args.format}: only a libvirt image can say it is compressed "
                             "(its header has the format code); this is a bare QEMU stream")
        ex = SequentialExport(img)
        prefix = img.libvirt.header.stream_offset if img.libvirt is not None else 0
        bar = Progress(ex.size, "exporting", enabled=False if args.quiet else None)
        chunk = 4 << 20
        with _new_file(out, bar) as f:
            if prefix:
                head = ex.read(0, prefix)
                if program is not None:
                    assert img.libvirt is not None  # a compressor for a bare stream was refused above
                    h = img.libvirt.header
                    head = encode.libvirt_header(h, head, format=fmt, complete=True) + head[92:]
                f.write(head)
                f.flush()
            if program is None:
                for off in range(prefix, ex.size, chunk):
                    f.write(ex.read(off, chunk))
                    bar(off + chunk)
            else:
                # As libvirt does: the header and XML as they are, the stream piped through
                # the compressor (`gzip -c` ...) into the same file after them.
                proc = subprocess.Popen([program, "-c"], stdin=subprocess.PIPE, stdout=f)
                assert proc.stdin is not None  # stdin=PIPE
                try:
                    for off in range(prefix, ex.size, chunk):
                        proc.stdin.write(ex.read(off, chunk))
                        bar(min(off + chunk, ex.size))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                if proc.wait() != 0:
                    raise RamfsError(f"{program} failed (exit status {proc.returncode})")
    if not args.quiet:
        print(f"{_show(out)}: sequential, {ex.pages} pages, {os.path.getsize(out)} bytes"
              + (f", {args.format} (libvirt format {int(fmt)})" if program else ""))
    return EXIT_OK


def cmd_phys(args: argparse.Namespace) -> int:
    return _write_phys_view(args, as_core=False)


def cmd_core(args: argparse.Namespace) -> int:
    return _write_phys_view(args, as_core=True)


# -- the cache ------------------------------------------------------------------------------

def _cache_policy(args: argparse.Namespace, own: dict[str, str | bool] | None = None) -> CachePolicy:
    """--cache-dir, --no-cache, --rebuild-cache, --keep-cache, --cache-max (or their -o forms)
    of this command line."""
    from ramfs.image.cache import CachePolicy, parse_limit

    own = own or {}
    directory = _value(own, "cache_dir") or getattr(args, "cache_dir", None)
    enabled = not (getattr(args, "no_cache", False) or bool(own.get("no_cache")))
    rebuild = bool(getattr(args, "rebuild_cache", False) or own.get("rebuild_cache"))
    keep = bool(getattr(args, "keep_cache", False) or own.get("keep_cache"))
    limit = _value(own, "cache_max") or getattr(args, "cache_max", None)
    if not enabled and (rebuild or keep):
        raise RamfsError(f"--no-cache writes no cache: {'--rebuild-cache' if rebuild else '--keep-cache'} "
                         "makes no sense with it")
    if limit is not None:
        parse_limit(limit)  # a bad value fails now, not after a long decompression
    return CachePolicy(directory=directory, enabled=enabled, rebuild=rebuild, keep=keep, max_size=limit)


def add_cache_arguments(s: argparse.ArgumentParser, *, keep: bool = False, off: bool = True) -> None:
    _complete(s.add_argument("--cache-dir", metavar="DIR",
                             help="the cache of indexes and decompressed images (default: $RAMFS_CACHE_DIR, "
                             "else $XDG_CACHE_HOME/ramfs, else ~/.cache/ramfs; see ramfs cache)"), COMPLETE_DIR)
    if off:
        s.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the cache: the index stays in memory, a compressed image "
                       "is decompressed into an unnamed temporary file")
    s.add_argument("--rebuild-cache", action="store_true",
                   help="ignore what the cache holds for these images and build it again")
    if keep:
        s.add_argument("--keep-cache", action="store_true",
                       help="keep the decompressed copy of a compressed image in the cache after use (it is "
                       "guest memory: by default it is removed when the image is closed or unmounted)")
        add_cache_max_argument(s)


def add_cache_max_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cache-max", metavar="SIZE",
                   help="most the kept decompressed images may take, least recently used evicted first: a "
                   "size (20G) or a share of the space the cache could use (30%%; default $RAMFS_CACHE_MAX, "
                   "else 50%%)")


def cmd_index(args: argparse.Namespace) -> int:
    """Build the cache entries of IMAGEs ahead of mounting (ratarmount's pre-building)."""
    from dataclasses import replace

    from ramfs.image import open_image

    policy = replace(_cache_policy(args), keep=True)  # building ahead is asking to keep
    status = EXIT_OK
    for path in args.image:
        bar = _scan_bar(args.quiet)
        try:
            try:
                img = open_image(path, cache=policy, progress=bar.scanned, snapshot=args.snapshot)
            finally:
                bar.done()
            with img:
                failed = [w for w in img.warnings if w.startswith("could not write the index cache")]
                if failed:
                    raise RamfsError(failed[0])
                line = _indexed(img)
        except RamfsError as e:
            print(f"ramfs: error: {_show(_naming(path, str(e)))}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        if not args.quiet:
            print(f"{_show(path)}: {line}", flush=True)
    return status


def _indexed(img: Image) -> str:
    """What ``ramfs index`` did for an open image, in a few words."""
    cached = " (already in the cache)" if img.index_from_cache else ""
    if img.held is not None and img.data is not None and img.format is not None:
        st = os.fstat(img.data.fd)
        return (f"decompressed ({img.format.label}), {_size(st.st_blocks * 512)} on disk, and indexed{cached}")
    if img.encoding == "mapped-ram":
        return "mapped-ram: nothing to build (its bitmaps are its index)"
    pages = sum(b.populated_pages for b in img.blocks)
    return f"indexed, {pages} populated pages{cached}"


def _cache_root(args: argparse.Namespace) -> Path:
    from ramfs.image.cache import cache_dir, user_cache_dir

    if args.cache_dir:
        return cache_dir(args.cache_dir)
    if args.user:
        return user_cache_dir(args.user)
    return cache_dir()


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cmd_cache(args: argparse.Namespace) -> int:
    from ramfs.image import cache

    root = _cache_root(args)
    action = getattr(args, "action", None) or "list"
    if action == "path":
        print(root)
        return EXIT_OK
    if action == "list":
        entries = cache.list_entries(root) if root.is_dir() else []
        decompressed = sum(e.disk_bytes for e in entries if e.kind == cache.DECOMPRESSED)
        spec = _cache_policy(args).limit_spec()
        limit = cache.resolve_limit(root, spec, decompressed)
        if args.json:
            json.dump({"cache_dir": _utf8(str(root.absolute())), "exists": root.is_dir(), "limit": limit,
                       "limit_spec": spec, "decompressed_bytes": decompressed,
                       "entries": [_entry_json(e) for e in entries]}, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return EXIT_OK
        if not root.is_dir():
            print(f"{_show(str(root))}: no cache yet")
            return EXIT_OK
        rows = [(e.kind, _size(e.disk_bytes), _when(e.last_used), _state(e), _image_of(e)) for e in entries]
        head = ("KIND", "SIZE", "LAST USED", "STATE", "IMAGE")
        w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        for r in [head, *rows]:
            print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}  {_show(r[4])}")
        total = sum(e.disk_bytes for e in entries)
        print(f"{_show(str(root))}: {_entries(len(entries))}, {_size(total)}; decompressed {_size(decompressed)} "
              f"of at most {_size(limit)} ({spec})")
        return EXIT_OK
    return _clean(root, args)


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _state(e: Entry) -> str:
    words = [e.state]
    if e.in_use:
        words.append("in use")
    elif not e.keep:
        words.append("not kept")  # left by a mount that died: the next eviction removes it
    return ", ".join(words)


def _image_of(e: Entry) -> str:
    if e.image is None:
        return "?"
    snap = e.meta.get("snapshot") if e.meta else None
    return f"{e.image} (snapshot {snap})" if snap else e.image


def _entry_json(e: Entry) -> dict[str, Any]:
    d = e.to_json()
    d["image"] = _utf8(d["image"]) if d["image"] else None
    d["snapshot"] = e.meta.get("snapshot") if e.meta else None
    d["files"] = [_utf8(f) for f in d["files"]]
    return d


def _clean(root: Path, args: argparse.Namespace) -> int:
    import time

    from ramfs.image import cache

    cutoff = time.time() - cache.parse_age(args.older_than) if args.older_than else None
    if not root.is_dir():
        print(f"{_show(str(root))}: no cache, nothing to clean")
        return EXIT_OK
    cache.check_ours(root)
    removed = freed = busy = failed = 0
    verb = "would remove" if args.dry_run else "removed"
    for e in cache.list_entries(root):
        if cutoff is not None and e.last_used > cutoff:
            continue
        if args.stale and e.state not in ("changed", "missing", "orphan"):
            continue
        if e.in_use:
            busy += 1
            if not args.quiet:
                print(f"in use, left: {e.kind} {_size(e.disk_bytes)} {_show(_image_of(e))}")
            continue
        try:
            if not args.dry_run and not cache.remove(root, e):
                busy += 1
                continue
        except OSError as err:
            print(f"ramfs: error: cannot remove {_show(str(e.files[0]))}: {err.strerror}", file=sys.stderr)
            failed += 1
            continue
        removed += 1
        freed += e.disk_bytes
        if not args.quiet:
            print(f"{verb}: {e.kind} {_size(e.disk_bytes)} {_show(_image_of(e))} ({e.state})")
    if cutoff is None and not args.dry_run:
        for p in cache.leftovers(root):
            try:
                p.unlink(missing_ok=True)
            except OSError as err:
                print(f"ramfs: error: cannot remove {_show(str(p))}: {err.strerror}", file=sys.stderr)
                failed += 1
    if not args.quiet:
        print(f"{_show(str(root))}: {verb} {_entries(removed)} ({_size(freed)})"
              + (f"; {busy} in use by a mount, left alone" if busy else ""))
    return EXIT_ERROR if failed else EXIT_OK


# -o options that are ramfs's own (as in an fstab line), and the argument each one sets.
RAMFS_OPTIONS = {"direct_io": "direct_io", "below_4g": "below_4g", "numa": "numa", "device": "device",
                 "jobs": "jobs", "log": "log",
                 "debug": "debug", "foreground": "foreground", "allow_other": "allow_other",
                 "run_as": "user", "readahead": "readahead", "nonempty": "nonempty",
                 "cache_dir": "cache_dir", "cache_max": "cache_max", "no_cache": "no_cache",
                 "rebuild_cache": "rebuild_cache", "keep_cache": "keep_cache"}
# Options mount(8), systemd or an fstab line may hand over that mean nothing to a FUSE mount:
# dropped instead of making libfuse fail with "unknown option".
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "rw"}


# ramfs's -o options that take a value (the others are flags).
VALUE_OPTIONS = {"below_4g", "numa", "device", "jobs", "log", "run_as", "readahead", "cache_dir", "cache_max"}


def _value(own: dict[str, str | bool], key: str) -> str | None:
    """A value option of ``split_mount_options`` (checked there to be a string)."""
    v = own.get(key)
    return v if isinstance(v, str) else None


def split_mount_options(groups: list[str] | None) -> tuple[list[str], dict[str, str | bool]]:
    """``-o`` groups -> (options for FUSE, ramfs settings). ``x-*`` and ``comment=`` options
    (systemd's and fstab's) are dropped like the others mount(8) does not pass to FUSE."""
    fuse: list[str] = []
    own: dict[str, str | bool] = {}
    for group in groups or []:
        for opt in (o.strip() for o in group.split(",")):
            key, eq, value = opt.partition("=")
            if not opt or opt in IGNORED_OPTIONS or key.startswith("x-") or key == "comment":
                continue
            if key in VALUE_OPTIONS and not (eq and value):
                raise RamfsError(f"-o {key} needs a value: {key}=...")
            if key == "device" and "device" in own:
                own["device"] = f"{own['device']}:{value}"  # repeatable, like --device
            elif key in RAMFS_OPTIONS:
                own[RAMFS_OPTIONS[key]] = value if eq else True
            else:
                fuse.append(opt)
    return fuse, own


def cmd_mount(args: argparse.Namespace) -> int:
    from ramfs.fs.daemon import mount

    fuse_opts, own = split_mount_options(args.o)
    try:
        jobs = int(own.get("jobs", args.jobs))
    except ValueError:
        raise RamfsError(f"-o jobs={own['jobs']}: not a number") from None
    placement = _placement(args, own)
    cache = _cache_policy(args, own)
    return mount(args.source, args.mountpoint, cache=cache, foreground=args.foreground or bool(own.get("foreground")),
                 readahead_kb=_readahead_kb(_value(own, "readahead") or args.readahead),
                 nonempty=args.nonempty or bool(own.get("nonempty")),
                 debug=args.debug or bool(own.get("debug")), options=fuse_opts,
                 allow_other=args.allow_other or bool(own.get("allow_other")),
                 direct_io=args.direct_io or bool(own.get("direct_io")),
                 log_file=_value(own, "log") or args.log, jobs=jobs,
                 placement=placement, systemd=args.systemd,
                 user=_value(own, "user") or args.user, quiet=args.quiet)


def _readahead_kb(text: str) -> int | None:
    """``--readahead``: a size (rounded up to KiB), or ``keep`` for the kernel's own."""
    if text == "keep":
        return None
    size = _parse_size(text)
    if not 4096 <= size <= 1 << 30:
        raise RamfsError(f"readahead {text}: between 4K and 1G, or keep (the kernel's default)")
    return -(-size // 1024)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


def cmd_manpage(args: argparse.Namespace) -> int:
    from ramfs.manpage import render

    sys.stdout.write(render(build_parser(), args.date))
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ramfs.fs.daemon import umount

    return umount(args.mountpoint, timeout=args.timeout)


def add_mount_arguments(s: argparse.ArgumentParser) -> None:
    _complete(s.add_argument("source", metavar="IMAGE|DIR", help="a save image, or a directory of them"), COMPLETE_FILE)
    _complete(s.add_argument("mountpoint"), COMPLETE_DIR)
    s.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    s.add_argument("--debug", action="store_true", help="log every FUSE request (implies nothing else)")
    s.add_argument("-o", action="append", metavar="OPT[,OPT...]",
                   help="mount options, as in fstab: FUSE's (ro, allow_other, ...) and ramfs's own "
                   "(direct_io, below_4g=SIZE, numa=ID:ID, device=ID@ADDR, jobs=N, log=FILE, run_as=USER, "
                   "readahead=SIZE|keep, nonempty, cache_dir=DIR, cache_max=SIZE, no_cache, rebuild_cache, "
                   "keep_cache, debug, foreground)")
    s.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (needs user_allow_other in /etc/fuse.conf)")
    s.add_argument("--direct-io", action="store_true",
                   help="read images with O_DIRECT and keep guest memory out of the page cache")
    s.add_argument("--log", metavar="FILE", help="log to FILE (default: stderr in the foreground, "
                   "else syslog)")
    s.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="directory mode: parallel page writers per conversion in convert/")
    s.add_argument("--user", metavar="USER",
                   help="as root: mount and open the images there are now, then drop to USER before "
                   "reading any of them (-o run_as=USER in fstab); images added later are opened as USER")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar while the image is indexed")
    s.add_argument("--readahead", metavar="SIZE|keep", default="1M",
                   help="the mount's readahead (its bdi read_ahead_kb, set when mounted as root), which "
                   "also caps the size of each read the kernel asks for: 1M (the default) lets every "
                   "request be as large as FUSE allows; keep leaves the kernel's 128K")
    s.add_argument("--nonempty", action="store_true",
                   help="mount even on a directory that is not empty (hiding what is in it)")
    s.add_argument("--systemd", action="store_true",
                   help="run under systemd (Type=notify): stay in the foreground, send READY=1 once "
                   "mounted and STOPPING=1 on unmount, log to the journal (docs/ramfs@.service)")
    s.add_argument("--below-4g", metavar="SIZE",
                   help="RAM below 4 GiB in phys/ when the guest ran with max-ram-below-4g (e.g. 2G)")
    add_placement_arguments(s)
    add_cache_arguments(s, keep=True)
    s.set_defaults(func=cmd_mount)


def add_snapshot_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--snapshot", metavar="NAME",
                   help="the image is a qcow2 disk: use the VM state of its internal snapshot NAME (or id), "
                   "as savevm, virsh snapshot-create-as or virt-manager made it")


def add_placement_arguments(s: argparse.ArgumentParser) -> None:
    """What phys/ needs to know and a bare stream does not record (a libvirt image's domain
    XML does): NUMA node order, memory device addresses."""
    s.add_argument("--numa", metavar="ID:ID...",
                   help="the RAM blocks of the NUMA nodes in node order (e.g. ram-node0:ram-node1), for a "
                   "bare stream of a guest with -numa memdev=; libvirt images say it in their domain XML")
    s.add_argument("--device", action="append", metavar="ID@ADDR",
                   help="place the RAM block ID (a DIMM's backend, e.g. memdimm0) at guest-physical ADDR; "
                   "repeatable")


MOUNT_EPILOG = """examples:
  ramfs mount /var/lib/libvirt/qemu/save/vm.save /mnt/vm
  ls /mnt/vm/ram; grep -c secret /mnt/vm/ram/pc.ram
  cp --sparse=always /mnt/vm/ram/pc.ram /tmp/pc.ram   # keep the holes
  ramfs mount /var/lib/libvirt/qemu/save /mnt/saves   # every image in the directory
  ramfs umount /mnt/vm
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ramfs", description="Read QEMU and libvirt VM save images "
                                "(sequential and mapped-ram, bare or in libvirt's container, any libvirt "
                                "compression): describe and check them, mount them as files (RAM blocks, "
                                "guest-physical memory, an ELF core, CPU state), and convert sequential "
                                "images to mapped-ram (libvirt's 'sparse' format) by copying them into "
                                "a mount's convert/ directory or with 'ramfs convert'.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_versions())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="describe a save image", description="Describe a save image: "
                       "container, format, machine, capabilities and RAM blocks.",
                       epilog="examples:\n  ramfs info /var/lib/libvirt/qemu/save/vm.save\n"
                       "  ramfs info --json vm.save | jq '.blocks[] | {idstr, populated_bytes}'\n"
                       "  ramfs info --jsonl /var/lib/libvirt/qemu/save/*.save | jq -r 'select(.error) | .path'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("image", nargs="+"), COMPLETE_FILE)
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the facts as JSON (docs/info-json.md, "
                     "schema docs/info.schema.json), one document per image")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar while a big image is scanned")
    out.add_argument("--jsonl", action="store_true", help="one compact JSON object per line and image; an "
                     "image that cannot be read gives {\"path\": ..., \"error\": ...}")
    add_placement_arguments(s)
    add_snapshot_argument(s)
    add_cache_arguments(s)
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("ls", help="list the RAM blocks like ls -l", description="List the RAM blocks of "
                       "IMAGE: size, bytes holding data (the rest reads as zeros), share, name.",
                       epilog="examples:\n  ramfs ls vm.save\n  ramfs ls --bytes vm.save | sort -k2 -n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("image"), COMPLETE_FILE)
    s.add_argument("--bytes", action="store_true", help="exact byte counts instead of KiB/MiB/GiB")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar while a big image is scanned")
    add_snapshot_argument(s)
    add_cache_arguments(s)
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("check", help="validate a save image's structure",
                       description="Validate a save image; list each problem and exit 1 if any.",
                       epilog="examples:\n  ramfs check vm.save\n"
                       "  for f in /var/lib/libvirt/qemu/save/*.save; do ramfs check \"$f\"; done",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("image"), COMPLETE_FILE)
    add_placement_arguments(s)
    add_snapshot_argument(s)
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("convert", help="convert a sequential image to mapped-ram (libvirt 'sparse')",
                       description="Convert a sequential save image (bare or libvirt, raw or compressed) "
                       "into a sparse mapped-ram image that QEMU >= 9.0 and libvirt >= 11.2 restore "
                       "(libvirt format 6). DST must not exist.",
                       epilog="examples:\n  ramfs convert vm.save vm-sparse.save\n"
                       "  ramfs convert --jobs 4 --direct-io /var/lib/libvirt/qemu/save/vm.save /srv/vm.save\n"
                       "  virsh restore vm-sparse.save --parallel-channels 4",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("src"), COMPLETE_FILE)
    _complete(s.add_argument("dst"), COMPLETE_FILE)
    s.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel page writers (default 1)")
    s.add_argument("--direct-io", action="store_true",
                   help="write page data with O_DIRECT, keeping it out of the page cache")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_snapshot_argument(s)
    s.set_defaults(func=cmd_convert)
    s = sub.add_parser("export", help="write the image as a classic sequential save image",
                       description="Write IMAGE (any encoding ramfs reads) as a classic sequential save "
                       "image that QEMU < 9.0 and libvirt < 11.2 restore: libvirt header format 0 (or "
                       "the --format compression, as libvirt writes it), no mapped-ram capability. "
                       "The same bytes as export/sequential.img of a mount. OUT must not exist.",
                       epilog="examples:\n  ramfs export vm-sparse.save vm-classic.save\n"
                       "  ramfs export --format zstd vm-sparse.save vm.save.zst && virsh restore vm.save.zst",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("image"), COMPLETE_FILE)
    _complete(s.add_argument("out"), COMPLETE_FILE)
    s.add_argument("--format", choices=list(EXPORT_FORMATS), default="raw",
                   help="compress the stream like libvirt (needs a libvirt image; default raw)")
    s.add_argument("--direct-io", action="store_true", help="read the image with O_DIRECT")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_snapshot_argument(s)
    add_cache_arguments(s, keep=True)
    s.set_defaults(func=cmd_export)
    for name, fn, what in (("phys", cmd_phys, "guest-physical memory (sparse; offset = address)"),
                           ("core", cmd_core, "an ELF core like QEMU's dump-guest-memory")):
        s = sub.add_parser(name, help=f"write {what}", description=f"Write {what} of IMAGE to OUT "
                           "(a new file), for tools such as Volatility 3, crash and gdb.",
                           epilog=f"example:\n  ramfs {name} vm.save {'vm.mem' if name == 'phys' else 'vm.elf'}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _complete(s.add_argument("image"), COMPLETE_FILE)
        _complete(s.add_argument("out"), COMPLETE_FILE)
        s.add_argument("--below-4g", metavar="SIZE", help="override the RAM split (max-ram-below-4g)")
        add_placement_arguments(s)
        s.add_argument("--direct-io", action="store_true", help="read the image with O_DIRECT")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        add_snapshot_argument(s)
        add_cache_arguments(s, keep=True)
        s.set_defaults(func=fn)
    s = sub.add_parser("mount", help="mount an image or a directory of images (read-only)",
                       description="Mount a save image (or every image in a directory) as files: "
                       "ram/<block>, maps/<block>, image.json, devices.json, domain.xml.",
                       epilog=MOUNT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mount_arguments(s)
    s = sub.add_parser("index", help="build the cache of images ahead of mounting",
                       description="Build what ramfs caches for each IMAGE now, so that mounting it later is "
                       "quick: the page index of a sequential image; for a compressed one, its decompressed "
                       "stream and index (kept until evicted or cleaned: see ramfs cache). mapped-ram images "
                       "need nothing. Exits 2 if any image failed.",
                       epilog="examples:\n  ramfs index /var/lib/libvirt/qemu/save/*.save\n"
                       "  ramfs index --rebuild-cache --cache-dir /srv/ramfs-cache vm.save",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("image", nargs="+"), COMPLETE_FILE)
    add_cache_arguments(s, off=False)
    add_cache_max_argument(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_snapshot_argument(s)
    s.set_defaults(func=cmd_index)
    s = sub.add_parser("cache", help="list, clean or locate the cache",
                       description="The cache of page indexes and decompressed images: list its entries "
                       "(kind, size, last use, whether the image still exists unchanged), clean them, or "
                       "print where it is. Without an action: list.",
                       epilog="examples:\n  ramfs cache list\n  ramfs cache clean --older-than 7d\n"
                       "  ramfs cache clean --stale\n  ramfs cache list --user ramfs --json | jq '.entries[].image'\n"
                       "  ramfs cache path",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.set_defaults(func=cmd_cache, action=None, cache_dir=None, user=None, json=False)
    actions = s.add_subparsers(dest="action", metavar="ACTION")
    for name, what in (("list", "list the entries"), ("clean", "remove entries (only ramfs's own files)"),
                       ("path", "print the cache directory in use")):
        a = actions.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        where = a.add_mutually_exclusive_group()
        _complete(where.add_argument("--cache-dir", metavar="DIR", help="this cache directory"), COMPLETE_DIR)
        where.add_argument("--user", metavar="USER", help="the cache of mounts run with --user USER "
                           "(/var/cache/ramfs/user-USER)")
        if name == "list":
            a.add_argument("--json", action="store_true", help="the entries as JSON")
            add_cache_max_argument(a)
        if name == "clean":
            a.add_argument("--older-than", metavar="AGE",
                           help="only entries last used longer ago than AGE (30m, 12h, 7d, 2w)")
            a.add_argument("--stale", action="store_true",
                           help="only entries whose image is gone or changed (or unknown)")
            a.add_argument("-n", "--dry-run", action="store_true", help="say what would be removed")
            a.add_argument("-q", "--quiet", action="store_true", help="print nothing")
        a.set_defaults(func=cmd_cache, action=name)
    s = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for bash or zsh.",
                       epilog="examples:\n  ramfs completion bash > /etc/bash_completion.d/ramfs\n"
                       "  ramfs completion zsh > /usr/local/share/zsh/site-functions/_ramfs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("shell", choices=("bash", "zsh"))
    s.set_defaults(func=cmd_completion)
    s = sub.add_parser("manpage", help="print the ramfs(1) man page (roff)",
                       description="Print the ramfs(1) man page, generated from this parser.",
                       epilog="example:\n  ramfs manpage > /usr/local/share/man/man1/ramfs.1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--date", help="date on the page (default: today)")
    s.set_defaults(func=cmd_manpage)
    s = sub.add_parser("umount", help="unmount and wait for the daemon to exit",
                       description="Unmount MOUNTPOINT and wait until the daemon has exited (and so "
                       "any conversion into convert/ has finished or been cleaned up).",
                       epilog="examples:\n  ramfs umount /mnt/vm\n  ramfs umount --timeout 600 /mnt/saves",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _complete(s.add_argument("mountpoint"), COMPLETE_DIR)
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for open files to close before stopping the daemon")
    s.set_defaults(func=cmd_umount)
    return p


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    # SIGTERM/SIGHUP (timeout, systemd): remove our temporaries and leave at once. Raising
    # instead could land inside a blocking call or a lock and never finish unwinding.
    from ramfs import tempfiles
    tempfiles.remove_all()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    group = parser._subparsers  # noqa: SLF001 - argparse has no API
    assert group is not None  # build_parser adds the commands
    commands = group._group_actions[0].choices  # noqa: SLF001
    assert commands is not None  # the sub-parsers, by name
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        # mount.fuse3 (mount -t fuse.ramfs, fstab) runs "ramfs SOURCE MOUNTPOINT -o OPTS".
        argv = ["mount", *argv]
    args = parser.parse_args(argv)
    from ramfs.memory import tune_malloc
    tune_malloc()
    if args.func is not cmd_mount:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RamfsError as e:
        print(f"ramfs: error: {_show(_about(args, e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _about(args: argparse.Namespace, error: RamfsError) -> str:
    """The message, naming the image when the error is about its bytes and does not name it
    already (a truncation found deep in the parser knows the offset, not the file); a bad
    option or an I/O error says what it is about itself."""
    from ramfs.errors import FormatError

    message = str(error)
    image = getattr(args, "image", None) or getattr(args, "src", None) or getattr(args, "source", None)
    if not isinstance(error, FormatError):
        return message
    if isinstance(image, list):
        image = image[0] if len(image) == 1 else None
    if not isinstance(image, str):
        return message
    others = [p for p in (getattr(args, "mountpoint", None), getattr(args, "dst", None),
                          getattr(args, "out", None)) if isinstance(p, str)]
    if any(_names(message, p) for p in others):
        return message  # about the mountpoint or the output, which it names
    return _naming(image, message)


def _names(message: str, path: str) -> bool:
    return path in message or os.path.realpath(path) in message


def _naming(path: str, message: str) -> str:
    """``path: message``, unless the message names the file already (most do)."""
    return message if _names(message, path) else f"{path}: {message}"


def mount_main() -> int:
    """``ramfs-mount IMAGE|DIR MOUNTPOINT [options]``: mount.py as an installed command."""
    return main(["mount", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())

