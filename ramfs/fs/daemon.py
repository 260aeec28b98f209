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
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ramfs.errors import RamfsError
from ramfs.fs.mountinfo import top_mount
from ramfs.fs.readahead import DEFAULT_READAHEAD_KB, open_readahead, set_readahead

if TYPE_CHECKING:
    import pwd

    from ramfs.fs.ops import Operations

    from ramfs.fs.tree import Tree
    from ramfs.image.cache import CachePolicy
    from ramfs.image.phys import Placement

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
          log_file: str | None = None, cache: CachePolicy | str | None = None, jobs: int = 1,
          below_4g: int | None = None, placement: Placement | None = None, systemd: bool = False,
          user: str | None = None, quiet: bool = False, readahead_kb: int | None = DEFAULT_READAHEAD_KB,
          nonempty: bool = False) -> int:
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
    if not os.path.lexists(mountpoint):
        raise RamfsError(f"mountpoint {mountpoint} does not exist (create it first: mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise RamfsError(f"mountpoint {mountpoint} is not a directory")
    if _is_mountpoint(mountpoint):
        raise RamfsError(f"{mountpoint} is already a mountpoint")
    if not os.path.exists(source):
        raise RamfsError(f"{source} does not exist")
    directory = os.path.isdir(source)
    from dataclasses import replace

    from ramfs.image.cache import CachePolicy

    account = _account(user) if user else None
    policy = cache if isinstance(cache, CachePolicy) else CachePolicy(directory=cache)
    if account is not None and policy.enabled and policy.directory is None:
        policy = replace(policy, directory=_user_cache(account))
    tree = Tree(direct_io=direct_io, cache=policy, below_4g=below_4g, placement=placement)
    tree.mountpoint = mountpoint
    tree.reader_name = account.pw_name if account is not None else None
    # Opened here, as whoever started us (root for --user): the files are then read through
    # these descriptors, whoever parses them.
    if directory:
        tree.open_directory(source, convert_jobs=jobs)
    else:
        tree.open_image_file(source)

    if not nonempty:
        try:
            with os.scandir(mountpoint) as it:
                inside = next(it, None)
        except OSError as e:
            tree.close()
            raise RamfsError(f"cannot read mountpoint {mountpoint}: {e.strerror}") from None
        if inside is not None:
            tree.close()
            raise RamfsError(f"mountpoint {mountpoint} is not empty (it holds {inside.name!r}, ...): the mount "
                             f"would hide what is there; use an empty directory, or --nonempty (-o nonempty)")

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
        try:
            fill()  # parse before mounting: a bad image fails the mount command itself
        except BaseException:
            tree.close()
            raise
        if os.geteuid() == 0:
            warning = "images are parsed as root: consider --user USER (see docs/security.md)"
            log.warning(warning)
            if not quiet and not foreground:  # in the foreground the log line is on stderr
                print(f"ramfs: warning: {warning}", file=sys.stderr)
    else:
        _preload()
    # default_permissions always: the kernel checks each request against the owners and
    # modes the tree mirrors from the source files (nothing an -o can turn off).
    opts = set(pyfuse3.default_options) | {"default_permissions"}
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
    # Opened now, as whoever mounted (root for --user); written once INIT is answered.
    readahead_fd = open_readahead(mountpoint) if readahead_kb is not None else None
    ready = None if foreground else _daemonize()
    pidfile = pidfile_for(mountpoint)
    try:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
    except OSError as e:
        log.warning("cannot write %s: %s", pidfile, e.strerror)
    if account is not None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child:
            # The root half: it never reads an image; it waits, passes signals on, reports
            # how the worker started, and unmounts when the worker is gone.
            os.close(status_w)
            if readahead_fd is not None:
                os.close(readahead_fd)  # the worker writes it
            return _supervise(child, status_r, mountpoint, pidfile, tree, systemd, ready, account.pw_name,
                              source)
        os.close(status_r)
        if ready is not None:
            ready.forget()  # the root half reports, having heard from us
        try:
            _drop_privileges(account)
            fill()
            ops.dynamic_root = tree.root is not None and tree.root.dynamic
        except BaseException as e:
            # Whatever it is, it must reach whoever started the mount: the root half
            # prints it (or sends it to the parent that waits on the terminal).
            if not isinstance(e, (RamfsError, OSError)):
                log.exception("as %s: the worker failed", account.pw_name)
            reason = str(e) if isinstance(e, (RamfsError, OSError)) else f"{type(e).__name__}: {e}"
            _report(status_w, f"E{reason}")
            os._exit(EXIT_FILL_FAILED)
        _report(status_w, "1")
    elif ready is not None:
        ready.ok()
    log.info("mounted %s on %s%s", source, mountpoint, f" as {account.pw_name}" if account else "")
    if systemd and account is None:
        # The kernel mount exists and requests queue until the loop below serves them.
        sd_notify(f"READY=1\nSTATUS=serving {source} on {mountpoint}\nMAINPID={os.getpid()}")
    clean = False
    try:
        trio.run(_serve, ops, readahead_fd, readahead_kb or 0)
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


def _report(fd: int, message: str) -> None:
    """One status message of the worker to the root half (then the pipe is closed)."""
    data = " ".join(message.split()).encode("utf-8", "backslashreplace")[:4000]
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _account(user: str) -> pwd.struct_passwd:
    import pwd

    if os.geteuid() != 0:
        raise RamfsError("--user needs root: it mounts as root, then drops to USER")
    try:
        return pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise RamfsError(f"--user {user}: no such user") from None


def _user_cache(account: pwd.struct_passwd) -> str:
    """A cache directory the dropped user owns (indexes it writes after the drop)."""
    from ramfs.image.cache import user_cache_dir

    d = user_cache_dir(account.pw_name)
    try:
        # /var/cache/ramfs as any system cache (USER must get through it); USER's own 0700.
        d.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        d.mkdir(exist_ok=True, mode=0o700)
        os.chown(d, account.pw_uid, account.pw_gid, follow_symlinks=False)
    except OSError as e:
        raise RamfsError(f"cannot prepare the cache {d} for {account.pw_name}: {e.strerror}") from None
    return str(d)


def _preload() -> None:
    """Import now, as root, every module the worker may need after dropping privileges: the
    unprivileged user may not be able to read where ramfs (or Python) is installed, and an
    import that fails after the drop would kill the worker in the middle of a request."""
    import importlib
    import pkgutil

    import ramfs
    for mod in pkgutil.walk_packages(ramfs.__path__, "ramfs."):
        importlib.import_module(mod.name)
    for name in ("zstandard", "lzma", "bz2", "zlib", "gzip", "encodings.idna", "json.encoder", "json.decoder",
                 "logging.handlers", "socket", "pwd", "grp", "ctypes", "ctypes.util", "fcntl", "mmap",
                 "secrets", "bisect", "dataclasses", "shutil", "subprocess", "tempfile", "traceback"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


# prctl(2) options (include/uapi/linux/prctl.h)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def _prctl(option: int, arg: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}, {arg}): {os.strerror(e)}")


def _drop_privileges(account: pwd.struct_passwd) -> None:
    """For good: no capability can come back (the bounding set is emptied while we still
    may, and no_new_privs stops setuid programs and file capabilities), then USER's uids,
    gids and groups, real, effective and saved."""
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != 22:  # EINVAL: a capability this kernel does not know
                raise RamfsError(f"cannot drop capability {cap} from the bounding set: {e.strerror}") from None
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
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


def _supervise(child: int, status_r: int, mountpoint: str, pidfile: Path, tree: Tree, systemd: bool,
               ready: _Ready | None, user: str, source: str) -> int:
    import pyfuse3

    tree.close()  # the worker has its own copies of the descriptors
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    status = b""
    while True:
        chunk = os.read(status_r, 4096)  # until the worker reports or dies
        if not chunk:
            break
        status += chunk
    os.close(status_r)
    started = status == b"1"
    if started:
        if ready is not None:
            ready.ok()
        if systemd:
            sd_notify(f"READY=1\nSTATUS=serving {mountpoint} as {user}\nMAINPID={os.getpid()}")
        log.info("serving %s as %s", mountpoint, user)
    while True:
        try:
            _, wstatus = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(wstatus)
    if systemd:
        sd_notify("STOPPING=1")
    pyfuse3.close(unmount=True)
    pidfile.unlink(missing_ok=True)
    if not started:
        if status.startswith(b"E"):
            reason = status[1:].decode("utf-8", "replace")
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            reason = f"the worker {how} before serving (see the log)"
        # The worker's reason names an offset, not always the file: the message names it.
        message = f"as {user}: {reason}" if source in reason else f"as {user}: {source}: {reason}"
        if ready is not None:
            ready.fail(message)
        raise RamfsError(message)
    log.info("unmounted %s", mountpoint)
    return 0 if code == 0 or -code in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) else 1


async def _serve(ops: Operations, readahead_fd: int | None, readahead_kb: int) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        if readahead_fd is not None:
            async def on_init(fd: int) -> None:
                await ops.initialized.wait()
                set_readahead(fd, readahead_kb)
            nursery.start_soon(on_init, readahead_fd)
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


class _Ready:
    """The daemon's side of the pipe the waiting parent reads: ``1`` once the mount serves,
    ``E`` and one line when it could not start (the parent prints it and exits 2)."""

    def __init__(self, fd: int):
        self._fd = fd

    def _send(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass
        self.forget()

    def ok(self) -> None:
        self._send(b"1")

    def fail(self, message: str) -> None:
        self._send(b"E" + message.encode("utf-8", "backslashreplace")[:4000])

    def forget(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _daemonize() -> _Ready:
    """Fork; the parent exits once the child reports through the returned :class:`_Ready`:
    0 when the mount serves, 2 with the child's one-line reason when it could not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        if data == b"1":
            os._exit(0)
        if data.startswith(b"E"):
            sys.stderr.write(f"ramfs: error: {data[1:].decode('utf-8', 'replace')}\n")
        else:
            sys.stderr.write("ramfs: error: the daemon exited before the mount was ready (see the log)\n")
        sys.stderr.flush()
        os._exit(2)
    os.close(r)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return _Ready(w)


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


# What the kernel calls a mount made with subtype=ramfs (ramfs mount, mount -t fuse.ramfs).
RAMFS_FSTYPE = f"fuse.{FSNAME_PREFIX}"


def _mount_fstype(mountpoint: str) -> str | None:
    """The file system type of the mount on top at ``mountpoint`` (e.g. ``fuse.ramfs``,
    ``tmpfs``), or None if nothing is mounted there."""
    entry = top_mount(mountpoint)
    return entry.fstype if entry is not None else None


def umount(mountpoint: str, *, timeout: float = 30.0) -> int:
    """Unmount and wait until the daemon has exited (lazily when files are still open)."""
    mountpoint = resolve_mountpoint(mountpoint)
    pidfile = pidfile_for(mountpoint)
    pid = None
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pass
    fstype = _mount_fstype(mountpoint)
    if fstype is None and not _is_mountpoint(mountpoint):
        raise RamfsError(f"{mountpoint} is not mounted")
    if fstype != RAMFS_FSTYPE:
        # Never unmount what is not ours (as root, fusermount3 -u unmounts anything).
        what = f"a {fstype} mount" if fstype else "not in /proc/self/mountinfo"
        raise RamfsError(f"{mountpoint} is {what}, not a ramfs mount: not unmounted")
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
    from ramfs.image.cache import pid_alive

    if not pid_alive(pid):
        return False
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

