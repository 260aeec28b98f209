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

# The man page and bash completion, where man(1) and bash-completion look for local ones.
venv_dir="$(dirname "$venv_bin")"
mkdir -p /usr/local/share/man/man1 /usr/local/share/bash-completion/completions
"$venv_bin" manpage > /usr/local/share/man/man1/ramfs.1
"$venv_bin" completion bash > /usr/local/share/bash-completion/completions/ramfs
