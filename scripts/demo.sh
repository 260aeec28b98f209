#!/usr/bin/env bash
# `make demo`: mount a real save image (written by QEMU 10 / libvirt 11.3, bundled in
# tests/data), show what ramfs makes of it, and unmount.
set -euo pipefail
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
img=$("$PY" -c 'import sys; sys.path.insert(0, "tests"); from fixture_data import fixture_path; print(fixture_path("libvirt/fw-pc-zstd.img"))')
mp=$(mktemp -d /tmp/ramfs-demo.XXXXXX)
cleanup() { "$PY" -m ramfs.cli umount "$mp" 2>/dev/null || fusermount3 -u -z "$mp" 2>/dev/null || true; rmdir "$mp"; }
trap cleanup EXIT

echo "== ramfs info (a zstd-compressed libvirt save image)"
"$PY" -m ramfs.cli info "$img"
echo
echo "== python mount.py $img $mp"
"$PY" mount.py "$img" "$mp"
echo
echo "== the tree"
(cd "$mp" && find . | sort | sed 's/^\.\///' | grep -v '^\.$' | while read -r f; do
    if [ -f "$f" ]; then printf '%-32s %10s bytes, %6s KiB on disk\n' "$f" "$(stat -c %s "$f")" "$(du -k "$f" | cut -f1)"; else printf '%s/\n' "$f"; fi
done)
echo
echo "== head domain.xml"
head -n 8 "$mp/domain.xml"
echo
echo "== head image.json"
head -n 20 "$mp/image.json"
echo
echo "== grep -c RAMFS-FIXTURE-MARKER ram/pc.ram   (the guest had a 64 KiB marker blob at 32 MiB)"
grep -c RAMFS-FIXTURE-MARKER "$mp/ram/pc.ram"
echo
echo "== maps/pc.ram: populated byte ranges (first 5)"
head -n 5 "$mp/maps/pc.ram"
echo
echo "== ramfs umount $mp"
"$PY" -m ramfs.cli umount "$mp"
trap - EXIT
rmdir "$mp"
echo "unmounted"
