#!/usr/bin/env python3
"""Pack the firmware/ and libvirt/ fixtures of the shared fixture folder into tests/data/.

    scripts/pack-fixtures.py [--shared DIR] [--out DIR] [--no-verify]

DIR defaults to ../shared/fixtures beside the repo.  Writes into tests/data/:

* fixtures.tar.xz: every image and ground-truth dump, decompressed, in one solid
  GNU tar (--sparse, raw hole detection, sorted, fixed owner/mtime) compressed as one
  LZMA2 block (preset 9e) whose dictionary covers the whole tar, so the images' shared
  content (the 1 MiB random blob, SeaBIOS, ...) is stored once;
* the *.xml / *-ramblock.txt / *-mtree.txt files as they are, under firmware/, libvirt/;
* manifest.json: the shared manifest's entries for these files, trimmed;
* README.md: the format decision and the sizes.

Needs GNU tar (for --sparse); compression uses Python's lzma.  The linux/ fixtures are not
copied.  Afterwards the archive is extracted once with tests/fixture_data.py and checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBDIRS = ("firmware", "libvirt")
ARCHIVE = "fixtures.tar.xz"
PAGE = 4096
CHUNK = 1 << 20

# Manifest fields kept (when the shared manifest has them).  Dropped: path/stored_size (the
# shared .xz names and sizes), verified, save_seconds, accel, method, written_by and the
# qemu_*_after_libvirt_restore facts, which describe the build, not the files.
KEEP = (
    "decompressed_path", "kind", "container", "guest", "machine", "machine_alias",
    "ram_bytes", "was_running", "sha256", "logical_size",
    "qemu_encoding", "capabilities", "parameters", "qemu_stream_offset",
    "qemu_stream_compression", "qemu_stream_first_bytes",
    "libvirt_format", "libvirt_header", "libvirt_domain", "libvirt_uuid", "virsh_save_flags",
    "ground_truth", "ground_truth_diff_ranges", "ground_truth_note",
    "independent_parse_equals_ground_truth", "ram_layout", "image", "what",
)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(CHUNK), b""):
            h.update(b)
    return h.hexdigest()


def write_sparse(chunks, dst: Path) -> tuple[str, int]:
    """Write the byte chunks to dst with 4 KiB zero pages as holes; return (sha256, size)."""
    h = hashlib.sha256()
    zero = bytes(PAGE)
    pos = 0
    with open(dst, "wb") as out:
        for chunk in chunks:
            h.update(chunk)
            for off in range(0, len(chunk), PAGE):
                page = chunk[off:off + PAGE]
                if page != zero[: len(page)]:
                    out.seek(pos + off)
                    out.write(page)
            pos += len(chunk)
        out.truncate(pos)
    return h.hexdigest(), pos


def xz_chunks(p: Path):
    with lzma.open(p, "rb") as f:
        yield from iter(lambda: f.read(CHUNK), b"")


def human(n: int) -> str:
    return f"{n / 1e6:.2f} MB ({n} bytes)"


def check_gnu_tar(tar: str) -> None:
    out = subprocess.run([tar, "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in out:
        sys.exit(f"{tar} is not GNU tar (needed for --sparse); pass --tar")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "fixtures")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    ap.add_argument("--tar", default="tar", help="GNU tar binary (default: tar)")
    ap.add_argument("--no-verify", action="store_true", help="skip the test extraction")
    args = ap.parse_args()
    shared: Path = args.shared.resolve()
    out: Path = args.out.resolve()
    check_gnu_tar(args.tar)

    meta = json.loads((shared / "manifest.json").read_text(encoding="utf-8"))
    chosen = [e for e in meta["files"] if e["decompressed_path"].split("/")[0] in SUBDIRS]
    chosen.sort(key=lambda e: e["decompressed_path"])
    archived = [e for e in chosen if e["path"].endswith(".xz")]
    plain = [e for e in chosen if not e["path"].endswith(".xz")]
    shared_xz_total = sum(e["stored_size"] for e in archived)
    logical_total = sum(e["logical_size"] for e in archived)

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pack-fixtures-") as tmp:
        stage = Path(tmp) / "stage"
        t0 = time.monotonic()
        for e in archived:
            dst = stage / e["decompressed_path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            digest, size = write_sparse(xz_chunks(shared / e["path"]), dst)
            if (digest, size) != (e["sha256"], e["logical_size"]):
                sys.exit(f"{e['path']}: decompressed sha256/size {digest}/{size} "
                         f"!= manifest {e['sha256']}/{e['logical_size']}")
        print(f"decompressed {len(archived)} files ({human(logical_total)} logical) "
              f"in {time.monotonic() - t0:.1f}s")

        # Deterministic solid tar; raw hole detection makes the sparse map depend only on
        # the content (512-byte zero blocks), not on the file system.
        tar_path = Path(tmp) / "fixtures.tar"
        names = [e["decompressed_path"] for e in archived]
        subprocess.run(
            [args.tar, "--create", f"--file={tar_path}", "--format=gnu", "--sparse",
             "--hole-detection=raw", "--sort=name", "--no-recursion", "--owner=0",
             "--group=0", "--numeric-owner", "--mtime=@0", "--mode=0644",
             f"--directory={stage}", "--", *names],
            check=True)
        tar_size = tar_path.stat().st_size

        # One LZMA2 block; the dictionary must reach back over the whole tar.
        dict_size = 1 << max(23, (tar_size - 1).bit_length())
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                    "dict_size": dict_size}]
        t0 = time.monotonic()
        new_archive = Path(tmp) / ARCHIVE
        comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   filters=filters)
        with open(tar_path, "rb") as fi, open(new_archive, "wb") as fo:
            for b in iter(lambda: fi.read(CHUNK), b""):
                fo.write(comp.compress(b))
            fo.write(comp.flush())
        archive_size = new_archive.stat().st_size
        print(f"tar {human(tar_size)} -> {ARCHIVE} {human(archive_size)} "
              f"(dict {dict_size >> 20} MiB) in {time.monotonic() - t0:.1f}s")

        # Install into tests/data: archive, text files, manifest, README.
        for sub in SUBDIRS:  # drop files of an earlier pack that are no longer shipped
            d = out / sub
            if d.is_dir():
                keep = {e["decompressed_path"] for e in plain}
                for f in d.rglob("*"):
                    if f.is_file() and f.relative_to(out).as_posix() not in keep:
                        f.unlink()
        for f in out.glob("*.tar.xz"):
            if f.name != ARCHIVE:
                f.unlink()
        shutil.copyfile(new_archive, out / (ARCHIVE + ".new"))
        os.replace(out / (ARCHIVE + ".new"), out / ARCHIVE)
        plain_total = 0
        for e in plain:
            src, dst = shared / e["path"], out / e["decompressed_path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o644)
            if sha256_file(dst) != e["sha256"]:
                sys.exit(f"{src}: sha256 does not match the manifest")
            plain_total += dst.stat().st_size

    archive_sha = sha256_file(out / ARCHIVE)
    files = []
    for e in chosen:
        t = {k: e[k] for k in KEEP if k in e}
        if e in archived:
            t["archive"] = ARCHIVE
        files.append(t)
    manifest = {
        "comment": "Trimmed copy of ../shared/fixtures/manifest.json for the files shipped "
                   "here; written by scripts/pack-fixtures.py. Entries with 'archive' are "
                   "inside that archive (use tests/fixture_data.py), the others are plain "
                   "files at decompressed_path.",
        "generator": meta.get("generator"),
        "qemu": meta.get("qemu"),
        "libvirt": meta.get("libvirt"),
        "blobs": meta.get("blobs", []),
        "archives": {ARCHIVE: {
            "sha256": archive_sha, "size": archive_size, "tar_size": tar_size,
            "format": "GNU tar (--sparse, raw hole detection, sorted) in xz: one LZMA2 "
                      f"block, preset 9e, dict {dict_size >> 20} MiB",
        }},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    manifest_size = (out / "manifest.json").stat().st_size

    (out / "README.md").write_text(README.format(
        n_arch=len(archived), n_plain=len(plain),
        logical=logical_total / 1e6, tar=tar_size / 1e6, dict=dict_size >> 20,
        archive=archive_size / 1e6, archive_b=archive_size,
        shared_xz=shared_xz_total / 1e6, plain=plain_total / 1e3,
        manifest=manifest_size / 1e3,
        total=(archive_size + plain_total + manifest_size) / 1e6,
    ), encoding="utf-8")

    if not args.no_verify:
        sys.path.insert(0, str(REPO / "tests"))
        if out != (REPO / "tests" / "data").resolve():
            print("(--out is not tests/data: skipping the test extraction)")
            return 0
        import fixture_data  # noqa: E402  (reads the manifest just written)
        with tempfile.TemporaryDirectory(prefix="pack-fixtures-check-") as tmp:
            t0 = time.monotonic()
            got = fixture_data.extract_archives(tmp)
            print(f"verified: {len(got)} files extracted and matched sha256 in "
                  f"{time.monotonic() - t0:.1f}s")
    return 0


README = """\
# tests/data: packed test fixtures

Written by `scripts/pack-fixtures.py` from `../shared/fixtures` (firmware/ and libvirt/
only; the linux/ fixtures, ~40 MB of xz, are not copied: tests may cross-check them when
`../shared/fixtures` exists). Read them through `tests/fixture_data.py`
(`fixture_path('firmware/pc-sequential.img')`), which extracts the archive once into
`${{RAMFS_TEST_CACHE:-~/.cache/ramfs-tests}}/fixtures-<sha256[:16] of the archive>/`,
checking every file's sha256 and size, with zero pages left as holes.

* `fixtures.tar.xz`: the {n_arch} images and ground-truth dumps, decompressed
  ({logical:.0f} MB logical), in one GNU tar with `--sparse --hole-detection=raw
  --sort=name`, fixed owner and mtime (tar: {tar:.1f} MB), compressed as a single LZMA2
  block, preset 9e, dictionary {dict} MiB (more than the tar, so every repeat is in reach).
  Python's `tarfile` reads the GNU sparse members; nothing outside the stdlib is needed.
* `firmware/`, `libvirt/`: the {n_plain} text files (`*.xml` from `virsh
  save-image-dumpxml`, `*-ramblock.txt`, `*-mtree.txt`) as they are.
* `manifest.json`: the shared manifest's entries for these files, trimmed (no `path` /
  `stored_size` of the shared .xz files, no build-only facts); `archive` names the archive
  holding an entry; `blobs` describes the two blobs in every guest's RAM.

## Sizes

| what | size |
|---|---|
| `fixtures.tar.xz` | {archive:.2f} MB ({archive_b} bytes) |
| text files | {plain:.0f} kB |
| `manifest.json` | {manifest:.0f} kB |
| **total** | **{total:.2f} MB** |
| the same images as per-file `xz -9e` in ../shared | {shared_xz:.1f} MB |

## Why this format

The images all hold the same guest RAM: the same incompressible 1 MiB random blob, the
same SeaBIOS, nearly the same device state. Per-file xz stores the random blob once per
file (~1.2 MB each). A solid archive with a dictionary larger than the whole tar stores it
once. Measured on the first pack (QEMU 10.0.2 / libvirt 11.3.0 fixtures):

* per-file xz (as in ../shared): 25.5 MB;
* solid tar + xz 9e, dict 64 MiB: 3.23 MB; GNU vs POSIX tar format, member order,
  `nice`/`depth`/`lc`/`pb` tuning, dict 32 vs 64 MiB: all within 0.1 %;
* of that, `libvirt/fw-pc-bzip2.img` alone costs 1.33 MB (BWT output shares nothing with
  the other files), gzip 0.28, zstd 0.18, xz 0.15, lzop 0.11 MB; all the raw streams,
  mapped-ram images and RAM dumps together ~1.2 MB.
* Rejected: storing the bzip2 image as its decompressed payload and re-running bzip2 at
  extraction. Python's `bz2` at level 9 does reproduce it byte for byte here (would save
  ~1.3 MB), but that ties the test data to one libbz2's exact output; not worth 1.3 MB.
  (xz re-compression did not reproduce; gzip/lzop/zstd have no stdlib re-encoder.)
* Rejected: page deltas between mapped-ram images. xz already finds those repeats.

Decompression is fast: the xz stream alone takes ~0.15 s; a full extraction with sha256
checks of all {n_arch} files ({logical:.0f} MB logical, mostly holes) takes a few seconds,
and a warm cache costs only a stat of each file.

Re-run `scripts/pack-fixtures.py` when ../shared/fixtures changes; it verifies the shared
files against their manifest and the new archive by a full test extraction.
"""

if __name__ == "__main__":
    sys.exit(main())
