"""``ramfs(1)`` in roff, generated from the argument parser so that it never drifts from
``--help`` (docs/ramfs.1 is this output; a test regenerates and compares it)."""

from __future__ import annotations

import argparse
import datetime

from ramfs import __version__

SEE_ALSO = "mount.fuse3(8), fusermount3(1), virsh(1), qemu(1), systemd.mount(5)"

EXTRA = {
    "FILES": [
        ("/etc/fstab", "a line like\n.EX\n/var/lib/libvirt/qemu/save  /mnt/saves  fuse.ramfs  "
                       "noauto,x-systemd.automount,allow_other  0 0\n.EE\nmounts through mount.fuse3(8)."),
        ("ramfs@.service", "a systemd unit template (docs/ramfs@.service): the instance is the escaped "
                           "mountpoint, the source comes from /etc/ramfs/INSTANCE.conf."),
        ("$RAMFS_CACHE_DIR, else $XDG_CACHE_HOME/ramfs, else ~/.cache/ramfs; /var/cache/ramfs/user-USER (--user)",
         "the cache (--cache-dir): page indexes of sequential images (index/) and decompressed streams of "
         "compressed ones (data/), keyed by path, size, mtime and inode, each with a metadata file; "
         "directories 0700, files 0600, a CACHEDIR.TAG. A decompressed stream is guest memory: it is removed "
         "when the image is closed or unmounted unless kept (ramfs index, --keep-cache), and kept ones are "
         "evicted least recently used first beyond --cache-max (RAMFS_CACHE_MAX, default 50% of the space "
         "the cache could use). ramfs cache list and ramfs cache clean manage it; safe to delete."),
    ],
    "EXIT STATUS": [("0", "success"), ("1", "check found problems"), ("2", "an error (one line on stderr)")],
}


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()[1:])


def _metavar(a: argparse.Action, default: str) -> str:
    """An option's metavar as --help shows it (a tuple: its names, space-separated)."""
    if not a.metavar:
        return default
    return a.metavar if isinstance(a.metavar, str) else " ".join(a.metavar)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):  # noqa: SLF001
            continue
        if a.option_strings:
            names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
            if a.nargs != 0:
                names += f" \\fI{_roff(_metavar(a, a.dest.upper()))}\\fR"
        else:
            names = f"\\fI{_roff(_metavar(a, a.dest))}\\fR"
        out += [".TP", names, _roff((a.help or "").replace("%%", "%"))]  # argparse's escape
    return out


def render(parser: argparse.ArgumentParser, date: str | None = None) -> str:
    date = date or datetime.date.today().isoformat()
    lines = [
        f'.TH RAMFS 1 "{date}" "ramfs {__version__}" "User Commands"',
        ".SH NAME",
        "ramfs \\- read, mount and convert QEMU and libvirt VM save images",
        ".SH SYNOPSIS",
        f".B ramfs\n{_roff(_usage(parser)[len('ramfs '):])}",
        ".br",
        ".B ramfs\n\\fISOURCE\\fR \\fIMOUNTPOINT\\fR [\\fB\\-o\\fR \\fIOPTIONS\\fR]   (as run by mount.fuse3)",
        ".SH DESCRIPTION",
        _roff(parser.description or ""),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    helps = {c.dest: c.help for c in sub._choices_actions}  # noqa: SLF001
    for name, p in sub.choices.items():
        lines += [".SS " + f"ramfs {name}", f".B ramfs\n{_roff(_usage(p)[len('ramfs '):])}", ".PP",
                  _roff(p.description or helps.get(name) or "")]
        lines += _options(p)
        if p.epilog:
            lines += [".PP", ".EX", _roff(p.epilog), ".EE"]
        # A command with actions of its own (ramfs cache list|clean|path): each with its options.
        for a in p._actions:  # noqa: SLF001
            if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
                for action, q in a.choices.items():
                    lines += [".TP", f"\\fBramfs {name} {action}\\fR", _roff(q.description or ""),
                              ".RS", *_options(q), ".RE"]
    lines += [".SH EXAMPLES", ".EX", _roff(parser.epilog or ""), ".EE"]
    for section, items in EXTRA.items():
        lines.append(f".SH {section}")
        for term, text in items:
            lines += [".TP", f"\\fB{_roff(term)}\\fR", text if ".EX" in text else _roff(text)]
    lines += [".SH SEE ALSO", _roff(SEE_ALSO), ""]
    return "\n".join(lines)
