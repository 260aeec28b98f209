"""Mount lifecycle: check, mount, daemonize, serve, unmount.

The mount happens in the calling process, so every error (bad image, busy mountpoint, no
/dev/fuse) is reported before ``ramfs mount`` returns. Only then does it fork: the parent
returns 0 once the child runs the event loop. SIGINT, SIGTERM and SIGHUP end the loop and
unmount cleanly; after an internal crash the mount is left dead (ENOTCONN) rather than
unmounted, so a tool mirroring the mountpoint never mistakes it for an empty directory.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from ramfs.errors import RamfsError

log = logging.getLogger("ramfs.fs")

FSNAME_PREFIX = "ramfs"


def runtime_dir() -> Path:
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "ramfs"
    if os.getuid() == 0:
        return Path("/run/ramfs")
    return Path(f"/tmp/ramfs-{os.getuid()}")


def resolve_mountpoint(path: str) -> str:
    """Absolute path with the parent resolved, without touching the mountpoint itself (it may
    be served by this very process, or be a dead mount)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def pidfile_for(mountpoint: str) -> Path:
    """Where the daemon serving ``mountpoint`` (an absolute, resolved path) records its pid."""
    key = hashlib.sha256(mountpoint.encode()).hexdigest()[:24]
    return runtime_dir() / f"{key}.pid"


def _is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return True  # ENOTCONN: a dead FUSE mount is still a mount


def mount(source: str, mountpoint: str, *, foreground: bool = False, debug: bool = False,
          options: list[str] | None = None, allow_other: bool = False, direct_io: bool = False,
          log_file: str | None = None, cache: str | None = None, jobs: int = 1,
          below_4g: int | None = None, systemd: bool = False, user: str | None = None,
          quiet: bool = False) -> int:
    import pyfuse3
    import trio

    from ramfs.fs.ops import Operations
    from ramfs.fs.tree import Tree

    if systemd:
        foreground = True  # systemd keeps the process; Type=notify hears when it is ready
    _setup_logging(debug, foreground, log_file, journal=systemd and not log_file)
    # Resolve paths now: once mounted, touching the mountpoint from this process before the
    # event loop runs would wait for ourselves.
    mountpoint = resolve_mountpoint(mountpoint)
    source = os.path.realpath(source)
    if not os.path.isdir(mountpoint):
        raise RamfsError(f"mountpoint {mountpoint} is not a directory")
    if _is_mountpoint(mountpoint):
        raise RamfsError(f"{mountpoint} is already a mountpoint")
    if not os.path.exists(source):
        raise RamfsError(f"{source} does not exist")
    directory = os.path.isdir(source)
    account = _account(user) if user else None
    if account is not None and cache is None:
        cache = _user_cache(account)
    tree = Tree(direct_io=direct_io, cache=cache, below_4g=below_4g)

    def fill() -> None:
        if directory:
            tree.mount_directory(source, convert_jobs=jobs)
            return
        from ramfs.progress import Progress
        # Before the mount exists, on the terminal of `ramfs mount` if there is one.
        bar = Progress(None, "indexing", enabled=None if sys.stderr.isatty() and not quiet else False)
        tree.progress = bar.scanned
        try:
            tree.mount_image(source)
        finally:
            bar.done()
            tree.progress = None

    if account is None:
        if os.geteuid() == 0:
            log.warning("parsing untrusted images as root: consider --user (a user that can read them)")
        fill()  # parse before mounting: a bad image fails the mount command itself
    else:
        tree.preopened = _preopen(source, directory)
    opts = set(pyfuse3.default_options)  # default_permissions
    # /proc/mounts then reads "SOURCE MOUNTPOINT fuse.ramfs ...", like any fstab mount.
    fsname = source.replace("\\", "\\\\").replace(",", "\\,")  # libfuse splits options at commas
    opts |= {f"fsname={fsname}", f"subtype={FSNAME_PREFIX}"}
    if not directory:
        opts.add("ro")  # one image: nothing is writable; a directory has convert/
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    for group in options or []:
        opts |= {o.strip() for o in group.split(",") if o.strip()}
    if "ro" in opts and "rw" in opts:
        opts.discard("rw")
    ops = Operations(tree)
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as e:
        tree.close()
        raise RamfsError(f"cannot mount on {mountpoint}: {e}") from None
    ready = None if foreground else _daemonize()
    pidfile = pidfile_for(mountpoint)
    try:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
    except OSError as e:
        log.warning("cannot write %s: %s", pidfile, e.strerror)
    if account is not None:
        child = os.fork()
        if child:
            # The root half: it never reads an image; it waits, passes signals on, and
            # unmounts when the worker is gone (the worker, unprivileged, cannot).
            return _supervise(child, mountpoint, pidfile, tree, systemd)
        _drop_privileges(account)
        try:
            fill()
        except (RamfsError, OSError) as e:
            log.error("as %s: %s", account.pw_name, e)
            os._exit(EXIT_FILL_FAILED)
        ops.uid, ops.gid = os.getuid(), os.getgid()
        ops.dynamic_root = tree.root is not None and tree.root.dynamic
    if tree.convert_dir is not None:
        # convert/ is the one writable place: only the mounting user's unless the mount is
        # shared, then everyone's, sticky like /tmp (default_permissions enforces both).
        tree.convert_dir.mode = stat.S_IFDIR | (0o1777 if "allow_other" in opts else 0o755)
    if ready is not None:
        ready()
    log.info("mounted %s on %s%s", source, mountpoint, f" as {account.pw_name}" if account else "")
    if systemd:
        # The kernel mount exists and requests queue until the loop below serves them.
        sd_notify(f"READY=1\nSTATUS=serving {source} on {mountpoint}\nMAINPID={os.getppid() if account else os.getpid()}")
    clean = False
    try:
        trio.run(_serve)
        clean = True
    finally:
        if systemd and account is None:
            sd_notify("STOPPING=1")
        if account is None:
            pyfuse3.close(unmount=clean)
        tree.close()
        if account is None:
            pidfile.unlink(missing_ok=True)
            log.info("unmounted %s", mountpoint)
    if account is not None:
        os._exit(0)  # the root half unmounts
    return 0


EXIT_FILL_FAILED = 3


def _account(user: str):
    import pwd

    if os.geteuid() != 0:
        raise RamfsError("--user needs root: it mounts as root, then drops to USER")
    try:
        return pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise RamfsError(f"--user {user}: no such user") from None


def _user_cache(account) -> str:
    """A cache directory the dropped user owns (indexes it writes after the drop)."""
    # Not under root's home (0700, so unreachable after the drop).
    d = Path("/var/cache/ramfs") / f"user-{account.pw_name}"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(d, account.pw_uid, account.pw_gid)
    except OSError as e:
        raise RamfsError(f"cannot prepare the cache {d} for {account.pw_name}: {e.strerror}") from None
    return str(d)


def _preopen(source: str, directory: bool) -> dict[str, int]:
    """Open the images there are now, as root, so the user needs no read access to them."""
    paths = [source] if not directory else [
        e.path for e in os.scandir(source) if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
    out = {}
    for p in paths:
        try:
            out[os.path.realpath(p)] = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            if not directory:
                raise RamfsError(f"cannot open {p}: {e.strerror}") from None
    return out


def _drop_privileges(account) -> None:
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)  # real, effective and saved: there is no way back
    os.environ["HOME"] = account.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = account.pw_name
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RamfsError("dropping privileges failed: setuid(0) still works")


def _supervise(child: int, mountpoint: str, pidfile: Path, tree, systemd: bool) -> int:
    import pyfuse3

    for fd in tree.preopened.values():
        os.close(fd)
    tree.preopened.clear()
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if systemd:
        sd_notify("STOPPING=1")
    pyfuse3.close(unmount=True)
    pidfile.unlink(missing_ok=True)
    if code == EXIT_FILL_FAILED:
        raise RamfsError(f"the images in {mountpoint} could not be read as the unprivileged user (see the log)")
    log.info("unmounted %s", mountpoint)
    return 0 if code == 0 or -code in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) else 1


async def _serve() -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        async def on_signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _daemonize():
    """Fork; the parent exits 0 once the child calls the returned ``ready()``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok == b"1" else 1)
    os.close(r)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def ready() -> None:
        os.write(w, b"1")
        os.close(w)
    return ready


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (sd_notify(3)), if it started us with a notify socket."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e.strerror)
        return False


class _JournalFormatter(logging.Formatter):
    """stderr lines for journald: a ``<N>`` syslog priority prefix (sd-daemon(3)) so levels
    survive, no timestamp (the journal has its own)."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = self.PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def _setup_logging(debug: bool, foreground: bool, log_file: str | None, journal: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if journal:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter("%(message)s"))
    elif log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ramfs: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("ramfs[%(process)d]: %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def umount(mountpoint: str, *, timeout: float = 30.0) -> int:
    """Unmount and wait until the daemon has exited (lazily when files are still open)."""
    mountpoint = resolve_mountpoint(mountpoint)
    pidfile = pidfile_for(mountpoint)
    pid = None
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pass
    if not _is_mountpoint(mountpoint):
        raise RamfsError(f"{mountpoint} is not mounted")
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        if "busy" in r.stderr.lower():
            # Open files keep the connection alive; detach now, the daemon exits after them.
            r = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if r.returncode != 0:
            raise RamfsError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")
    if pid is None:
        return 0
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            if not _wait_gone(pid, timeout):
                raise RamfsError(f"ramfs daemon {pid} did not exit")
            break
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False

