"""Help people find: --help with examples, the man page generated from the parser, completion."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from ramfs.cli import build_parser
from ramfs.manpage import render

COMMANDS = ["info", "ls", "check", "convert", "export", "phys", "core", "mount", "index", "cache", "umount",
            "completion", "manpage"]


def ramfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=60)


def test_every_command_is_listed_and_has_help_with_an_example():
    top = ramfs("--help")
    assert top.returncode == 0 and "examples:" in top.stdout
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert sorted(sub) == sorted(COMMANDS)
    for name in COMMANDS:
        r = ramfs(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: ramfs {name}"), name
        assert re.search(r"^examples?:\n  ramfs ", r.stdout, re.M), f"ramfs {name} --help has no example"


def test_committed_man_page_is_the_generated_one():
    committed = (REPO / "docs" / "ramfs.1").read_text()
    date = re.search(r'^\.TH RAMFS 1 "([^"]+)"', committed, re.M).group(1)
    assert committed == render(build_parser(), date), "docs/ramfs.1 is stale: ramfs manpage --date DATE > docs/ramfs.1"


def test_man_page_renders_cleanly_and_covers_every_option():
    page = ramfs("manpage", "--date", "2026-01-01").stdout
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    text = subprocess.run(["groff", "-man", "-Tascii"], input=page, capture_output=True, text=True).stdout
    text = re.sub(r".\x08", "", text)
    for name in COMMANDS:
        assert f"ramfs {name}" in text
    for opt in ("--direct-io", "--systemd", "--below-4g", "--jsonl", "--allow-other", "--jobs", "--cache-dir",
                "--no-cache", "--rebuild-cache", "--keep-cache", "--cache-max", "--older-than", "--stale"):
        assert opt in text.replace("\u2010", "-"), opt
    assert "fuse.ramfs" in text and "EXIT STATUS" in text
    for action in ("list", "clean", "path"):
        assert f"ramfs cache {action}" in text


def bash_complete(script, line: str, cwd=None) -> subprocess.CompletedProcess:
    """What bash completes for ``line`` with the completion ``script`` sourced (in ``cwd``)."""
    probe = (f"source {script}\n" + (f"cd {cwd}\n" if cwd else "") +
             f"COMP_LINE='{line}'; COMP_POINT={len(line)}\n"
             f"read -ra COMP_WORDS <<< '{line}'\n"
             f"[[ '{line}' == *' ' ]] && COMP_WORDS+=('')\n"
             "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
             "fn=$(complete -p ramfs | sed -E 's/.*-F ([^ ]+).*/\\1/')\n"
             "$fn ramfs \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"\n"
             "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("words,want", [("ramfs ", "mount"), ("ramfs mo", "mount"), ("ramfs info --js", "--jsonl"),
                                        ("ramfs mount --dir", "--direct-io"), ("ramfs ca", "cache"),
                                        ("ramfs cache ", "clean"), ("ramfs cache clean --ol", "--older-than"),
                                        ("ramfs mount --no-c", "--no-cache"),
                                        ("ramfs index --rebu", "--rebuild-cache")])
def test_bash_completion_completes(words, want, tmp_path):
    script = tmp_path / "ramfs.bash"
    script.write_text(ramfs("completion", "bash").stdout)
    r = bash_complete(script, words)
    assert want in r.stdout.split(), r.stdout + r.stderr


def test_bash_completion_completes_file_and_directory_names(tmp_path):
    """Images, outputs and sources complete to file names, mountpoints to directories."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "fw-pc-sparse.img").write_bytes(b"x")
    (work / "fw-pc-raw.img").write_bytes(b"x")
    (work / "mnt-a").mkdir()
    script = tmp_path / "ramfs.bash"
    script.write_text(ramfs("completion", "bash").stdout)

    def complete(line: str) -> list[str]:
        r = bash_complete(script, line, cwd=work)
        return sorted(w.rstrip("/") for w in r.stdout.split())

    assert complete("ramfs info fw-pc-sp") == ["fw-pc-sparse.img"]
    assert complete("ramfs convert fw-pc-r") == ["fw-pc-raw.img"]
    assert complete("ramfs mount fw-pc-raw.img mnt") == ["mnt-a"]
    assert complete("ramfs mount fw-pc-raw.img fw") == []  # a mountpoint is a directory
    assert "_files" in ramfs("completion", "zsh").stdout


def test_zsh_completion_is_generated_for_every_command():
    text = ramfs("completion", "zsh").stdout
    assert text.startswith("#compdef ramfs")
    for name in COMMANDS:
        assert f'"{name}:' in text or f"'{name}:" in text or f"{name}:" in text, name
