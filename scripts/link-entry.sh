#!/bin/bash
# Put `ramfs` where mount(8) finds it. mount.fuse3 (mount -t fuse.ramfs, fstab lines) runs
# "ramfs SOURCE MOUNTPOINT -o OPTS" through /bin/sh with no PATH of its own, so the shell's
# default one applies: /usr/local/bin is in it, a virtualenv is not. A pip/pipx install puts
# the command there by itself; this links the development virtualenv's in the same place,
# never replacing a `ramfs` that is not such a link.
set -euo pipefail
venv_bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
target=/usr/local/bin/ramfs
if [ -e "$target" ] && [ ! -L "$target" ]; then
    echo "link-entry: $target exists and is not a link; leaving it (mount -t fuse.ramfs runs it)" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "link-entry: not root; mount -t fuse.ramfs needs $target -> $venv_bin" >&2
    exit 0
fi
ln -sfn "$venv_bin" "$target"
