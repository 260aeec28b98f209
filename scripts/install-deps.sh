#!/usr/bin/env bash
# Install the system packages ramfs and its tests need, on Debian 12, as root.
# Quick when everything is already there: each step checks first.
set -euo pipefail

want_qemu=${WANT_QEMU:-1}
pkgs=(fuse3 libfuse3-dev pkg-config lzop zstd xz-utils bzip2 gzip gcc)
# The tests also install ramfs the way users do (pipx) and render its man page (groff).
if [ "$want_qemu" = 1 ]; then pkgs+=(pipx groff-base); fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    command -v qemu-system-aarch64 >/dev/null 2>&1 || return 1  # the aarch64 virt guests
    command -v qemu-system-ppc64 >/dev/null 2>&1 || return 1  # pseries guests (spapr/htab)
    command -v qemu-system-s390x >/dev/null 2>&1 || return 1  # s390-ccw-virtio (storage attributes)
    # mapped-ram needs QEMU >= 9.0; Debian 12's own QEMU is 7.2.
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

# pyfuse3 is built from source: it needs Python's headers and a working venv module.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
if [ ! -e "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    missing+=(python3-dev)
fi

need_update=0
if [ "$want_qemu" = 1 ] && ! qemu_ok; then
    # bookworm-backports carries QEMU 10. The source is derived from the first stanza of the
    # machine's own debian.sources so that no mirror host name is written into the repository.
    src=/etc/apt/sources.list.d/debian.sources
    bp=/etc/apt/sources.list.d/ramfs-bookworm-backports.sources
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        awk 'BEGIN{RS=""; ORS="\n\n"} NR==1 {print; exit}' "$src" \
            | sed -e 's/^Suites:.*/Suites: bookworm-backports/' > "$bp"
    fi
    need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_update = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$want_qemu" = 1 ] && ! qemu_ok; then
    apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-system-arm qemu-system-ppc qemu-system-s390x qemu-utils >/dev/null
fi
# The kernel module may need loading on some hosts; /dev/fuse is present here.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
