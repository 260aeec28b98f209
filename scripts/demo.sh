#!/usr/bin/env bash
# `make demo`: open a real libvirt save image written by QEMU 10 / libvirt 11.3 and show it.
set -euo pipefail
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
img=$("$PY" -c 'import sys; sys.path.insert(0, "tests"); from fixture_data import fixture_path; print(fixture_path("libvirt/fw-pc-zstd.img"))')
echo "== ramfs info $img"
"$PY" -m ramfs.cli info "$img"
echo
echo "== ramfs check $img"
"$PY" -m ramfs.cli check "$img"
echo
echo "== the 64 KiB marker blob the guest had at 32 MiB, read back through ramfs"
"$PY" - "$img" <<'PY'
import sys
from ramfs.image import open_image
with open_image(sys.argv[1]) as img:
    data = img.read("pc.ram", 0x2000000, 64)
    print(data.decode())
PY
