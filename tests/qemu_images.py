"""Make real QEMU save images at test time, and cache them.

The test-suite (and features that must *prove* a conversion by restoring the
result in real QEMU) need VM save images whose RAM content is known exactly.
This module boots a firmware-only guest (SeaBIOS, no disk) with data blobs
loaded into RAM by ``-device loader``, lets it run briefly, stops it, and
writes:

* ``pmemsave.bin``: QMP ``pmemsave`` of guest-physical ``[0, ram)``, which is
  the ground truth for the RAM block ``pc.ram`` (as long as RAM stays below
  the machine's below-4G split, see ``Recipe``);
* ``sequential.img``: a plain ``migrate`` to ``file:``;
* ``mapped-ram.img`` and ``mapped-ram-multifd.img``: written by fresh QEMU
  processes that restored ``sequential.img`` (QEMU refuses a second
  ``migrate`` after a completed one) and were checked against the ground
  truth first.

Every derived image is then restored once more and compared with the ground
truth before the build counts as done, so a cached image is a proven one.

``build_linux`` does the same for a diskless Linux guest (Debian 12's kernel and
busybox, see ``LinuxRecipe``), with QEMU's ``dump-guest-memory`` as the truth.

Only the standard library is used, and ``ramfs`` is deliberately not
imported: this module is the independent referee for ramfs.

Facts this relies on:

* ``-cpu qemu64,kvmclock=off``: with kvmclock, SeaBIOS registers a pvclock
  page in guest RAM that KVM rewrites right after an incoming migration, so
  a KVM restore would not be byte-exact.
* A paused, never-resumed guest restored with ``-S -incoming defer`` keeps
  exactly the RAM of the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

# Bump whenever the images this module writes change for the same recipe
# and QEMU (command line, build steps, file names): it is part of the cache
# key, so old cache entries are simply ignored.
GENERATOR_VERSION = 1

QEMU_BINARY_NAME = 'qemu-system-x86_64'
CACHE_ENV_VAR = 'RAMFS_TEST_CACHE'
DEFAULT_CACHE_ROOT = Path('~/.cache/ramfs-tests')

PAGE_SIZE = 4096
MIB = 1 << 20

# Below 1 MiB live the legacy VGA/ROM windows (0xA0000-0xFFFFF) and
# SeaBIOS's own data; blobs there would be overwritten or shadowed.
LOWEST_BLOB_ADDR = 0x100000
# SeaBIOS relocates its init code and temporary allocations to about
# 16 MiB below the top of RAM and puts ACPI tables in the last 128 KiB, so
# blobs in [ram - 17 MiB, ram) could be overwritten while the guest runs
# (observed for 64 and 512 MiB, pc and q35, KVM: the lowest page SeaBIOS
# wrote was ram - 0x101F000; everything from 1 MiB up to there stayed intact).
SEABIOS_HIGH_ZONE = 17 * MIB
# RAM sizes at which the machine starts to split RAM into below- and
# above-4G parts (pc: >= 3.5 GiB -> 3 GiB low; q35: >= 2.75 GiB -> 2 GiB
# low). Below these, guest-physical [0, ram) is exactly the RAM block
# pc.ram, which is what makes pmemsave a ground truth for it.
BELOW_4G_SPLIT_THRESHOLD = {'pc': 0xE0000000, 'q35': 0xB0000000}

# Self-describing pattern: every 4 KiB page of a pattern blob is this unit
# (with the blob's seed and the page index inside the blob) repeated and cut.
PATTERN_UNIT_FORMAT = b'RAMFS-BLOB-%d-PAGE-%08d'

# Raised from QEMU's default of 128 MiB/s: a file: migration has no reason
# to be throttled, and the default makes large guests slow to save.
MAX_BANDWIDTH = 1 << 40  # bytes per second
MULTIFD_CHANNELS = 4

QEMU_START_TIMEOUT = 30.0      # until the QMP socket accepts a connection
QMP_COMMAND_TIMEOUT = 120.0    # one QMP command (pmemsave of a big guest)
MIGRATION_TIMEOUT = 300.0      # one save or restore
QEMU_EXIT_TIMEOUT = 10.0       # after 'quit' or SIGKILL
LOCK_TIMEOUT = 600.0           # waiting for another process's build
POLL_INTERVAL = 0.05
STDERR_TAIL_BYTES = 4000

# Unix socket paths are limited to 108 bytes including the NUL.
MAX_UNIX_SOCKET_PATH = 107

IMAGE_FILES = {
    'sequential': 'sequential.img',
    'pmemsave': 'pmemsave.bin',
    'mapped_ram': 'mapped-ram.img',
    'mapped_ram_multifd': 'mapped-ram-multifd.img',
    'recipe_json': 'recipe.json',
}
DONE_MARKER = 'DONE'
CACHE_DIR_MODE = 0o755

# Capabilities and parameters for each derived image.
MAPPED_RAM_CAPABILITIES = ('mapped-ram',)
MAPPED_RAM_MULTIFD_CAPABILITIES = ('mapped-ram', 'multifd')


# --------------------------------------------------------------------- errors

class QemuError(RuntimeError):
    """Anything that went wrong while driving QEMU."""


class QemuNotFoundError(QemuError):
    """qemu-system-x86_64 is not installed; the tests must fail, not skip."""


class QemuTimeoutError(QemuError, TimeoutError):
    """QEMU did not answer or finish in time."""


class QMPError(QemuError):
    """A QMP command returned an error."""

    def __init__(self, command: str, arguments: Mapping[str, Any], error: Mapping[str, Any]):
        self.command = command
        self.arguments = dict(arguments)
        self.error_class = error.get('class', '?')
        self.desc = error.get('desc', '?')
        super().__init__('QMP %s %s failed: %s: %s'
                         % (command, json.dumps(self.arguments), self.error_class, self.desc))


class MigrationError(QemuError):
    """A save or restore failed; the message carries QEMU's own error text."""


class GroundTruthMismatch(QemuError):
    """A restored guest's RAM is not byte-identical to the ground truth."""


# -------------------------------------------------------------------- recipes

@dataclasses.dataclass(frozen=True)
class Blob:
    """Data loaded at guest-physical ``addr`` before the firmware starts.

    ``random`` is ``random.Random(seed).randbytes(size)`` (incompressible,
    like real RAM); ``pattern`` names each of its pages (see
    ``PATTERN_UNIT_FORMAT``) so a test can tell which page ended up where.
    """

    addr: int
    size: int
    kind: Literal['random', 'pattern']
    seed: int

    def __post_init__(self) -> None:
        if self.kind not in ('random', 'pattern'):
            raise ValueError('Blob kind must be random or pattern, not %r' % (self.kind,))
        if self.size <= 0:
            raise ValueError('Blob size must be positive: %r' % (self,))
        if self.addr % PAGE_SIZE:
            raise ValueError('Blob addr must be page aligned: %#x' % self.addr)

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a guest's images (and so its cache key)."""

    machine: Literal['pc', 'q35']
    ram_mib: int
    blobs: tuple[Blob, ...]
    run_seconds: float

    def __post_init__(self) -> None:
        if self.machine not in BELOW_4G_SPLIT_THRESHOLD:
            raise ValueError('machine must be pc or q35, not %r' % (self.machine,))
        if self.ram_mib <= 0:
            raise ValueError('ram_mib must be positive')
        if self.ram_bytes >= BELOW_4G_SPLIT_THRESHOLD[self.machine]:
            raise ValueError(
                '%s with %d MiB RAM splits RAM around the PCI hole, so pmemsave of '
                '[0, ram) would not be pc.ram; stay below %#x bytes'
                % (self.machine, self.ram_mib, BELOW_4G_SPLIT_THRESHOLD[self.machine]))
        if not isinstance(self.blobs, tuple):
            raise TypeError('blobs must be a tuple (the recipe is hashed and cached)')
        if self.run_seconds < 0:
            raise ValueError('run_seconds must not be negative')
        high_zone = max(LOWEST_BLOB_ADDR, self.ram_bytes - SEABIOS_HIGH_ZONE)
        previous: Blob | None = None
        for blob in sorted(self.blobs, key=lambda b: b.addr):
            if blob.addr < LOWEST_BLOB_ADDR or blob.end > high_zone:
                raise ValueError('blob %r must lie in [%#x, %#x): below is legacy/BIOS memory, '
                                 'above is where SeaBIOS writes' % (blob, LOWEST_BLOB_ADDR, high_zone))
            if previous is not None and blob.addr < previous.end:
                raise ValueError('blobs overlap: %r and %r' % (previous, blob))
            previous = blob

    @property
    def ram_bytes(self) -> int:
        return self.ram_mib * MIB


@dataclasses.dataclass(frozen=True)
class GuestImages:
    """The cached files of one built recipe (all inside ``directory``)."""

    recipe: Recipe
    ram_bytes: int
    directory: Path
    sequential: Path
    pmemsave: Path
    mapped_ram: Path
    mapped_ram_multifd: Path
    recipe_json: Path

    @property
    def info(self) -> dict[str, Any]:
        """Build facts recorded in recipe.json (accelerator, QEMU version...)."""
        return json.loads(self.recipe_json.read_text())


@dataclasses.dataclass(frozen=True)
class MachineArgs:
    """A guest given by its QEMU command line instead of a ``Recipe``.

    For restoring images this module did not make (e.g. a guest saved by
    libvirt with its own device model), or for one-off guests with extra options: ``args`` is everything except the
    binary, ``-qmp`` and ``-S -incoming defer``, which are added. Accepted by
    ``restore_and_dump``, ``save_stopped_guest`` and ``save_running_guest``
    (no blobs, no cache); ``ram_bytes`` is what pmemsave dumps.
    """

    args: tuple[str, ...]
    ram_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            raise TypeError('args must be a tuple')
        if self.ram_bytes <= 0:
            raise ValueError('ram_bytes must be positive')


def _random_blob(address: int, size: int, seed: int) -> Blob:
    return Blob(addr=address, size=size, kind='random', seed=seed)


def _pattern_blob(address: int, size: int, seed: int) -> Blob:
    return Blob(addr=address, size=size, kind='pattern', seed=seed)


# Like the shared fixtures (random blob identical to theirs), small enough to
# build in a couple of seconds.
SMALL_PC = Recipe(
    machine='pc', ram_mib=64,
    blobs=(_random_blob(16 * MIB, 1 * MIB, seed=1),
           _pattern_blob(32 * MIB, 64 * 1024, seed=2)),
    run_seconds=1.0)
SMALL_Q35 = dataclasses.replace(SMALL_PC, machine='q35')

# 512 MiB with 48 MiB of blobs spread over RAM, one not MiB-aligned, one
# just below the area SeaBIOS writes near the top of RAM.
LARGE_PC = Recipe(
    machine='pc', ram_mib=512,
    blobs=(_random_blob(16 * MIB, 16 * MIB, seed=11),
           _pattern_blob(64 * MIB, 8 * MIB, seed=12),
           _random_blob(128 * MIB + 3 * PAGE_SIZE, 8 * MIB, seed=13),
           _pattern_blob(256 * MIB, 4 * MIB, seed=14),
           _random_blob(384 * MIB, 8 * MIB, seed=15),
           _pattern_blob(512 * MIB - SEABIOS_HIGH_ZONE - 4 * MIB, 4 * MIB, seed=16)),
    run_seconds=1.0)


def pattern_page(seed: int, index: int) -> bytes:
    """Page ``index`` (0-based, inside the blob) of a pattern blob."""
    unit = PATTERN_UNIT_FORMAT % (seed, index)
    return (unit * math.ceil(PAGE_SIZE / len(unit)))[:PAGE_SIZE]


def blob_bytes(blob: Blob) -> bytes:
    """The exact bytes the loader puts at ``blob.addr``."""
    if blob.kind == 'random':
        return random.Random(blob.seed).randbytes(blob.size)
    pages = math.ceil(blob.size / PAGE_SIZE)
    return b''.join(pattern_page(blob.seed, i) for i in range(pages))[:blob.size]


# ----------------------------------------------------------------------- QMP

class QMPClient:
    """Minimal QMP client: one unix socket, JSON lines, no out-of-band."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = QEMU_START_TIMEOUT,
                 alive: Callable[[], bool] | None = None,
                 command_timeout: float = QMP_COMMAND_TIMEOUT):
        """Connect (retrying until QEMU has created the socket) and negotiate.

        ``alive`` lets the connect loop give up at once when the QEMU process
        has already exited instead of waiting for the timeout.
        """
        self.path = os.fspath(path)
        self.command_timeout = command_timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b''
        self._sock = self._connect(timeout, alive)
        try:
            self.greeting = self._read_message(time.monotonic() + command_timeout)
            if 'QMP' not in self.greeting:
                raise QemuError('unexpected QMP greeting on %s: %r' % (self.path, self.greeting))
            self.execute('qmp_capabilities')
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float, alive: Callable[[], bool] | None) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError as exc:
                sock.close()
                if alive is not None and not alive():
                    raise QemuError('QEMU exited before its QMP socket %s accepted a connection'
                                    % self.path) from exc
                if time.monotonic() > deadline:
                    raise QemuTimeoutError('no QMP socket at %s after %.0f s: %s'
                                           % (self.path, timeout, exc)) from exc
                time.sleep(POLL_INTERVAL)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b'\n' not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuTimeoutError('QMP %s: no answer in time' % self.path)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise QemuTimeoutError('QMP %s: no answer in time' % self.path) from exc
            if not chunk:
                raise QemuError('QMP connection %s closed (QEMU exited?)' % self.path)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b'\n', 1)
        return json.loads(line)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, /,
                **kwargs: Any) -> Any:
        """Run ``command`` and return its ``return`` value.

        QMP argument names often contain hyphens, so they can be given as a
        mapping (``execute('migrate-set-parameters', {'max-bandwidth': n})``)
        as well as keywords. Events that arrive meanwhile go to ``events``.
        """
        args = dict(arguments or {}, **kwargs)
        message: dict[str, Any] = {'execute': command}
        if args:
            message['arguments'] = args
        self._sock.settimeout(self.command_timeout)
        self._sock.sendall(json.dumps(message).encode() + b'\n')
        deadline = time.monotonic() + self.command_timeout
        while True:
            reply = self._read_message(deadline)
            if 'event' in reply:
                self.events.append(reply)
            elif 'error' in reply:
                raise QMPError(command, args, reply['error'])
            elif 'return' in reply:
                return reply['return']
            else:
                raise QemuError('unexpected QMP message for %s: %r' % (command, reply))

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command (quote file names: see fixtures README)."""
        return self.execute('human-monitor-command', {'command-line': command_line})

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """Return (and consume) the first event called ``name``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event['event'] == name:
                    return self.events.pop(i)
            message = self._read_message(deadline)
            if 'event' in message:
                self.events.append(message)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


# ---------------------------------------------------------------- processes

@functools.cache
def qemu_binary() -> str:
    """Path of qemu-system-x86_64; a clear error (not a skip) when missing."""
    path = shutil.which(QEMU_BINARY_NAME)
    if path is None:
        raise QemuNotFoundError(
            '%s is not on PATH. The ramfs tests need real QEMU 10 (Debian package '
            'qemu-system-x86); install the test dependencies (make / '
            'scripts/install-deps.sh).' % QEMU_BINARY_NAME)
    return path


@functools.cache
def qemu_version() -> str:
    """First line of ``qemu-system-x86_64 --version`` (part of the cache key)."""
    result = subprocess.run([qemu_binary(), '--version'], capture_output=True, text=True,
                            timeout=QEMU_START_TIMEOUT, check=True)
    return result.stdout.splitlines()[0].strip()


def _qemu_option_value(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return os.fspath(value).replace(',', ',,')


def _file_uri(path: str | os.PathLike[str], offset: int = 0) -> str:
    """``file:`` migration URI; QEMU's parser cannot escape commas."""
    path = os.path.abspath(path)
    if ',' in path:
        raise ValueError('QEMU file: migration URIs cannot contain commas: %r' % path)
    if offset < 0:
        raise ValueError('offset must not be negative')
    return 'file:%s,offset=%#x' % (path, offset) if offset else 'file:' + path


def qemu_command_line(recipe: Recipe | MachineArgs, qmp_socket: str | os.PathLike[str], *,
                      blob_files: Sequence[tuple[Blob, Path]] = (),
                      incoming: bool = False) -> list[str]:
    """argv of the guest for ``recipe`` (or of a ``MachineArgs`` guest).

    The guest that runs gets ``-device loader`` for each blob. QEMUs that
    restore an image (``incoming=True``) get none: the loader device has
    no migration state and no RAM block of its own, so the device model is
    the same, and without it the restored RAM comes from the image alone
    (the loader would otherwise pre-fill the blobs at reset and hide a page
    that a conversion lost).
    """
    if isinstance(recipe, MachineArgs):
        if blob_files:
            raise ValueError('blobs need a Recipe')
        argv = [qemu_binary(), *recipe.args,
                '-qmp', 'unix:%s,server=on,wait=off' % _qemu_option_value(qmp_socket)]
        return argv + (['-S', '-incoming', 'defer'] if incoming else [])
    argv = [qemu_binary(),
            '-accel', 'kvm', '-accel', 'tcg',
            '-cpu', 'qemu64,kvmclock=off',
            '-machine', recipe.machine,
            '-m', '%dM' % recipe.ram_mib,
            '-smp', '1',
            '-nodefaults', '-no-user-config', '-display', 'none',
            '-qmp', 'unix:%s,server=on,wait=off' % _qemu_option_value(qmp_socket)]
    for blob, path in blob_files:
        argv += ['-device', 'loader,file=%s,addr=%#x,force-raw=on'
                 % (_qemu_option_value(path), blob.addr)]
    if incoming:
        argv += ['-S', '-incoming', 'defer']
    return argv


def _kill_with_parent() -> None:
    """Runs in the child: SIGKILL QEMU if the Python process dies abruptly
    (e.g. pytest-timeout's thread method calls os._exit), so no guest is
    left spinning in SeaBIOS's retry loop."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class QemuProcess:
    """One QEMU process plus its QMP connection; use as a context manager.

    Leaving the ``with`` block always ends the process: ``quit`` over QMP,
    then SIGKILL to its PID if it is still there.
    """

    def __init__(self, argv: Sequence[str], qmp_socket: Path, log_path: Path):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        try:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                            stderr=subprocess.STDOUT,
                                            preexec_fn=_kill_with_parent)
        except BaseException:
            self._log.close()
            raise
        try:
            self.qmp = QMPClient(qmp_socket, alive=lambda: self.process.poll() is None)
        except QemuError as exc:
            self.close()
            raise QemuError('%s\n%s' % (exc, self.describe())) from exc
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_tail(self) -> str:
        """The end of QEMU's stdout/stderr: where its real error text is."""
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return '(no QEMU log: %s)' % exc
        return data[-STDERR_TAIL_BYTES:].decode('utf-8', 'replace').strip()

    def describe(self) -> str:
        status = self.process.poll()
        state = 'running' if status is None else 'exited with status %s' % status
        return 'QEMU pid %d %s; command line: %s\nQEMU output: %s' % (
            self.pid, state, ' '.join(self.argv), self.stderr_tail() or '(none)')

    def close(self) -> None:
        try:
            if self.process.poll() is None and hasattr(self, 'qmp'):
                with contextlib.suppress(QemuError, OSError):
                    self.qmp.command_timeout = QEMU_EXIT_TIMEOUT
                    self.qmp.execute('quit')
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=QEMU_EXIT_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()  # our own child, by PID
                self.process.wait(timeout=QEMU_EXIT_TIMEOUT)
            if hasattr(self, 'qmp'):
                self.qmp.close()
            self._log.close()

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers built on QMP

    def set_capabilities(self, capabilities: Sequence[str]) -> None:
        if capabilities:
            self.qmp.execute('migrate-set-capabilities', capabilities=[
                {'capability': name, 'state': True} for name in capabilities])

    def set_parameters(self, **parameters: Any) -> None:
        """Keyword names use underscores; QMP wants hyphens."""
        if parameters:
            self.qmp.execute('migrate-set-parameters',
                             {name.replace('_', '-'): value for name, value in parameters.items()})

    def wait_for_migration(self, what: str, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed; raise with QEMU's error text."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise MigrationError('%s: QEMU exited\n%s' % (what, self.describe()))
            info = self.qmp.execute('query-migrate')
            status = info.get('status')
            if status == 'completed':
                return info
            if status in ('failed', 'cancelled'):
                raise MigrationError('%s %s: %s\n%s' % (
                    what, status, info.get('error-desc', '(no error-desc)'), self.describe()))
            if time.monotonic() > deadline:
                raise QemuTimeoutError('%s still %r after %.0f s\n%s'
                                       % (what, status, timeout, self.describe()))
            time.sleep(POLL_INTERVAL)

    def save(self, path: Path, capabilities: Sequence[str] = (), **parameters: Any) -> None:
        """Migrate the (stopped) guest to ``file:path`` and wait for it."""
        self.set_capabilities(capabilities)
        self.set_parameters(max_bandwidth=MAX_BANDWIDTH, **parameters)
        self.qmp.execute('migrate', uri=_file_uri(path))
        self.wait_for_migration('save to %s' % path)

    def load(self, path: Path, capabilities: Sequence[str] = (), offset: int = 0,
             **parameters: Any) -> None:
        """Restore ``path`` into this ``-incoming defer`` QEMU and wait.

        ``exit-on-error: false`` keeps QEMU alive after a failed load, so
        ``query-migrate`` can still report why.
        """
        self.set_capabilities(capabilities)
        self.set_parameters(**parameters)
        self.qmp.execute('migrate-incoming', {'uri': _file_uri(path, offset),
                                              'exit-on-error': False})
        self.wait_for_migration('restore of %s' % path)
        status = self.qmp.execute('query-status')['status']
        if status != 'paused':
            raise MigrationError('restore of %s finished in run state %r, expected paused\n%s'
                                 % (path, status, self.describe()))

    def pmemsave(self, size: int, path: Path) -> Path:
        self.qmp.execute('pmemsave', val=0, size=size, filename=os.path.abspath(path))
        return path


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """Short-lived directory for QMP sockets and QEMU logs.

    Kept out of the cache directory because unix socket paths are limited
    to 107 bytes and the cache root may be deep.
    """
    path = Path(tempfile.mkdtemp(prefix='ramfs-qemu-'))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(recipe: Recipe | MachineArgs, scratch: Path, name: str, *,
           blob_files: Sequence[tuple[Blob, Path]] = (), incoming: bool = False) -> QemuProcess:
    sock = scratch / (name + '.qmp')
    if len(os.fsencode(sock)) > MAX_UNIX_SOCKET_PATH:
        raise QemuError('QMP socket path too long for a unix socket: %s (set TMPDIR shorter)' % sock)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    argv = qemu_command_line(recipe, sock, blob_files=blob_files, incoming=incoming)
    return QemuProcess(argv, sock, scratch / (name + '.log'))


# ------------------------------------------------------------------ dumps

def first_difference(path_a: Path, path_b: Path, *, max_pages: int = 8) -> str | None:
    """None if both files are byte-identical, else a short description of
    where they differ (first differing pages), for error messages."""
    chunk_size = 4 * MIB
    size_a, size_b = os.path.getsize(path_a), os.path.getsize(path_b)
    differing: list[int] = []
    total = 0
    with open(path_a, 'rb') as file_a, open(path_b, 'rb') as file_b:
        offset = 0
        while True:
            chunk_a, chunk_b = file_a.read(chunk_size), file_b.read(chunk_size)
            if not chunk_a and not chunk_b:
                break
            if chunk_a != chunk_b:
                for page in range(0, max(len(chunk_a), len(chunk_b)), PAGE_SIZE):
                    if chunk_a[page:page + PAGE_SIZE] != chunk_b[page:page + PAGE_SIZE]:
                        total += 1
                        if len(differing) < max_pages:
                            differing.append(offset + page)
            offset += chunk_size
    if not total and size_a == size_b:
        return None
    return '%s (%d bytes) vs %s (%d bytes): %d differing pages, first at %s' % (
        path_a, size_a, path_b, size_b, total, ', '.join('%#x' % x for x in differing))


def _check_same(dump: Path, ground_truth: Path, what: str) -> None:
    difference = first_difference(dump, ground_truth)
    if difference is not None:
        raise GroundTruthMismatch('%s does not equal the ground truth: %s' % (what, difference))


def restore_and_dump(image_path: str | os.PathLike[str], recipe: Recipe | MachineArgs, *,
                     capabilities: Sequence[str] = (), offset: int = 0,
                     multifd_channels: int | None = None,
                     out_path: str | os.PathLike[str],
                     timeout: float = MIGRATION_TIMEOUT) -> Path:
    """Restore ``image_path`` in a fresh, never-started QEMU and pmemsave its RAM.

    This is the proof step for conversions: the result is what real QEMU
    sees in the image. ``capabilities`` must match how the stream was
    written (e.g. ``('mapped-ram',)`` or ``('mapped-ram', 'multifd')``);
    ``offset`` is where the QEMU stream starts in the file (libvirt images:
    92 + data_len). ``recipe`` may also be a ``MachineArgs`` (a guest given
    by its command line). Raises
    ``MigrationError`` with QEMU's error text when QEMU rejects the image;
    writes ``out_path`` (``ram_bytes`` long) on success and returns it.
    """
    image = Path(image_path)
    out = Path(out_path)
    if not image.is_file():
        raise FileNotFoundError('no image to restore at %s' % image)
    parameters: dict[str, Any] = {}
    if multifd_channels is not None:
        if 'multifd' not in capabilities:
            raise ValueError('multifd_channels needs the multifd capability')
        parameters['multifd_channels'] = multifd_channels
    with _scratch_dir() as scratch, _start(recipe, scratch, 'restore', incoming=True) as qemu:
        try:
            qemu.load(image, capabilities, offset, **parameters)
        except QemuTimeoutError as exc:
            raise QemuTimeoutError('restore of %s with capabilities %s, offset %#x: %s'
                                   % (image, list(capabilities), offset, exc)) from exc
        qemu.pmemsave(recipe.ram_bytes, out)
    return out


@contextlib.contextmanager
def _booted_guest(machine: Recipe | MachineArgs, scratch: Path) -> Iterator[QemuProcess]:
    """A running guest (with its blobs, for a Recipe), ended on exit."""
    blob_files = []
    for i, blob in enumerate(machine.blobs if isinstance(machine, Recipe) else ()):
        path = scratch / ('blob-%d.bin' % i)
        path.write_bytes(blob_bytes(blob))
        blob_files.append((blob, path))
    with _start(machine, scratch, 'guest', blob_files=blob_files) as guest:
        yield guest


def save_running_guest(machine: Recipe | MachineArgs, out_path: str | os.PathLike[str], *,
                       run_seconds: float = 0.5, max_bandwidth: int = 8 * MIB) -> Path:
    """Save a guest *while it runs* (a live ``migrate`` to ``file:``).

    Pages the guest dirties during the save are sent again, so the sequential
    stream holds several records for some pages (the last one wins); the
    bandwidth limit stretches the save so that this happens. There is no
    ground truth: restore the stream itself to get one. Not cached.
    """
    out = Path(out_path)
    with _scratch_dir() as scratch, _booted_guest(machine, scratch) as guest:
        time.sleep(run_seconds)
        guest.set_parameters(max_bandwidth=max_bandwidth)
        guest.qmp.execute('migrate', uri=_file_uri(out))
        guest.wait_for_migration('live save to %s' % out)
    return out


def save_stopped_guest(machine: Recipe | MachineArgs, out_path: str | os.PathLike[str],
                       dump_path: str | os.PathLike[str], *, run_seconds: float = 0.5) -> Path:
    """Run a guest briefly, stop it, pmemsave it to ``dump_path`` (its ground
    truth) and save it to ``out_path`` with no capabilities. Not cached: for
    one-off device models (``MachineArgs``, e.g. with ``-global`` migration
    properties that change the stream's shape)."""
    out = Path(out_path)
    with _scratch_dir() as scratch, _booted_guest(machine, scratch) as guest:
        time.sleep(run_seconds)
        guest.qmp.execute('stop')
        guest.pmemsave(machine.ram_bytes, Path(dump_path))
        guest.save(out)
    return out


# ------------------------------------------------------------------- build

def cache_root() -> Path:
    """``$RAMFS_TEST_CACHE``, else ``~/.cache/ramfs-tests``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT).expanduser()


def cache_key(recipe: Recipe) -> str:
    """sha256 of what determines the images: recipe, QEMU, this generator."""
    material = '\n'.join([repr(recipe), qemu_version(), 'generator %d' % GENERATOR_VERSION])
    return hashlib.sha256(material.encode()).hexdigest()


def cache_dir(recipe: Recipe) -> Path:
    return cache_root() / ('qemu-%s' % cache_key(recipe)[:16])


def _images_in(directory: Path, recipe: Recipe) -> GuestImages:
    return GuestImages(recipe=recipe, ram_bytes=recipe.ram_bytes, directory=directory,
                       **{field: directory / name for field, name in IMAGE_FILES.items()})


def _is_complete(images: GuestImages) -> bool:
    return (images.directory / DONE_MARKER).is_file() and all(
        getattr(images, field).is_file() for field in IMAGE_FILES)


@contextlib.contextmanager
def _exclusive_lock(path: Path, timeout: float) -> Iterator[None]:
    """flock ``path``; polls so that a stuck holder gives a clear error."""
    deadline = time.monotonic() + timeout
    with open(path, 'a+b') as lock_file:
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise QemuTimeoutError('another process has held the build lock %s for '
                                           'more than %.0f s' % (path, timeout)) from exc
                time.sleep(POLL_INTERVAL * 4)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build(recipe: Recipe) -> GuestImages:
    """Return the images of ``recipe``, building them on a cache miss.

    The build happens in a temporary sibling directory that is renamed into
    place only after ``DONE`` was written, so an interrupted build never
    looks complete; a per-key flock makes concurrent test runs wait for one
    build instead of doing it twice.
    """
    final = cache_dir(recipe)
    images = _images_in(final, recipe)
    _build_cached(final, lambda: _is_complete(images), lambda work: _build_into(work, recipe))
    return images


def _build_cached(final: Path, complete: Callable[[], bool], build_into: Callable[[Path], None]) -> None:
    """Make the cache directory ``final`` unless ``complete()``: the build happens in a
    temporary sibling directory that is renamed into place only after ``DONE`` was written,
    so an interrupted build never looks complete; a per-key flock makes concurrent test runs
    wait for one build instead of doing it twice."""
    if complete():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.parent / (final.name + '.lock'), LOCK_TIMEOUT):
        if complete():  # built by someone else while we waited
            return
        # Under the lock nobody else is building this key: anything left is
        # debris of an interrupted build.
        for stale in final.parent.glob(final.name + '.tmp-*'):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        work = Path(tempfile.mkdtemp(prefix=final.name + '.tmp-', dir=final.parent))
        try:
            build_into(work)
            work.chmod(CACHE_DIR_MODE)  # mkdtemp makes it 0700
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _build_into(directory: Path, recipe: Recipe) -> None:
    started = time.monotonic()
    images = _images_in(directory, recipe)
    steps: dict[str, float] = {}

    def step_done(name: str, since: float) -> float:
        now = time.monotonic()
        steps[name] = round(now - since, 3)
        return now

    # Big temporary files go into the build directory, not the scratch
    # directory: if the build is killed, the next build of this key removes
    # them, while /tmp would keep them.
    blob_dir = directory / 'blobs'
    blob_dir.mkdir()
    blob_files = []
    for i, blob in enumerate(recipe.blobs):
        path = blob_dir / ('blob-%d.bin' % i)
        path.write_bytes(blob_bytes(blob))
        blob_files.append((blob, path))
    check_dump = directory / 'check.bin'

    with _scratch_dir() as scratch:
        # 1. The original guest: run, stop, ground truth, sequential save.
        t = time.monotonic()
        with _start(recipe, scratch, 'source', blob_files=blob_files) as source:
            time.sleep(recipe.run_seconds)
            source.qmp.execute('stop')
            kvm = source.qmp.execute('query-kvm')
            machine_type = source.qmp.execute('qom-get', path='/machine', property='type')
            source.pmemsave(recipe.ram_bytes, images.pmemsave)
            source.save(images.sequential)
        t = step_done('source run + pmemsave + sequential save', t)
        for blob in recipe.blobs:
            with open(images.pmemsave, 'rb') as dump:
                dump.seek(blob.addr)
                if dump.read(blob.size) != blob_bytes(blob):
                    raise GroundTruthMismatch('the guest overwrote blob %r in %s; move it'
                                              % (blob, images.pmemsave))

        # 2. Derived encodings, each from a fresh QEMU that restored the
        #    sequential image (QEMU refuses a second migrate after a
        #    completed one).
        derived = ((images.mapped_ram, MAPPED_RAM_CAPABILITIES, {}),
                   (images.mapped_ram_multifd, MAPPED_RAM_MULTIFD_CAPABILITIES,
                    {'multifd_channels': MULTIFD_CHANNELS}))
        for target, capabilities, parameters in derived:
            with _start(recipe, scratch, 'resave', incoming=True) as resave:
                resave.load(images.sequential)
                resave.pmemsave(recipe.ram_bytes, check_dump)
                _check_same(check_dump, images.pmemsave,
                            'RAM restored from %s' % images.sequential.name)
                resave.save(target, capabilities, **parameters)
            t = step_done('write ' + target.name, t)

        # 3. Prove the derived images restore to the ground truth (the
        #    sequential one was already restored and compared in step 2).
        for target, capabilities, parameters in derived:
            restore_and_dump(target, recipe, capabilities=capabilities,
                             multifd_channels=parameters.get('multifd_channels'),
                             out_path=check_dump)
            _check_same(check_dump, images.pmemsave, 'RAM restored from %s' % target.name)
            t = step_done('verify ' + target.name, t)
    check_dump.unlink()
    shutil.rmtree(blob_dir)

    info = {
        'generator_version': GENERATOR_VERSION,
        'qemu_version': qemu_version(),
        'cache_key': cache_key(recipe),
        'recipe': dataclasses.asdict(recipe),
        'ram_bytes': recipe.ram_bytes,
        'machine_type': machine_type,
        'accelerator': 'kvm' if kvm.get('enabled') else 'tcg',
        'files': {name: {'size': os.path.getsize(directory / name),
                         'allocated': os.stat(directory / name).st_blocks * 512}
                  for field, name in IMAGE_FILES.items() if field != 'recipe_json'},
        'capabilities': {IMAGE_FILES['sequential']: [],
                         IMAGE_FILES['mapped_ram']: list(MAPPED_RAM_CAPABILITIES),
                         IMAGE_FILES['mapped_ram_multifd']: list(MAPPED_RAM_MULTIFD_CAPABILITIES)},
        'multifd_channels': MULTIFD_CHANNELS,
        'build_seconds': round(time.monotonic() - started, 3),
        'build_steps_seconds': steps,
        'built_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }
    images.recipe_json.write_text(json.dumps(info, indent=1) + '\n')
    (directory / DONE_MARKER).write_text('done\n')


# ------------------------------------------------------------- Linux guest
#
# For what only a real kernel does, e.g. publishing its VMCOREINFO ELF note through
# the vmcoreinfo device: a diskless Linux guest booted with -kernel/-initrd.
# Kernel: Debian 12's own (the package linux-image-amd64 depends on), userland:
# busybox-static, both fetched with 'apt-get download' while building; only the
# boot files and the images are kept. Under TCG, because KVM rewrites the kvmclock
# page of a restored Linux guest (restored RAM would not be byte-exact) and TCG
# makes the same guest state twice; the boot takes ~10 s here.

LINUX_GENERATOR_VERSION = 1
KERNEL_METAPACKAGE = 'linux-image-amd64'
BUSYBOX_PACKAGE = 'busybox-static'
FW_CFG_MODULE = 'qemu_fw_cfg'
LINUX_READY_MARKER = 'RAMFS-LINUX-GUEST-READY'
LINUX_BOOT_TIMEOUT = 300.0     # kernel boot to the marker (TCG: ~10 s unloaded)
APT_TIMEOUT = 600.0            # one apt-get/apt-cache call
GUEST_DUMP_TIMEOUT = 300.0     # one dump-guest-memory of the whole RAM

LINUX_FILES = {
    'kernel': 'vmlinuz',
    'initrd': 'initrd.cpio',
    'sequential': 'sequential.img',
    'mapped_ram': 'mapped-ram.img',
    'dump_head': 'qemu-dump-head.bin',
    'recipe_json': 'recipe.json',
}

# The init of the guest's initramfs. Loading qemu_fw_cfg makes the kernel write
# its VMCOREINFO note's address and size to fw_cfg etc/vmcoreinfo (drivers/
# firmware/qemu_fw_cfg.c fw_cfg_write_vmcoreinfo, when QEMU has the vmcoreinfo
# device and fw_cfg DMA); the probe runs inside insmod, so the note is published
# before the marker is printed.
LINUX_INIT = '''#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
%(insmod)s
if [ -e /sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo ]; then v=yes; else v=no; fi
echo "%(marker)s fw_cfg-vmcoreinfo=$v"
while :; do /bin/busybox sleep 3600; done
'''


@dataclasses.dataclass(frozen=True)
class LinuxRecipe:
    """A diskless Linux guest: everything that determines its images (and cache key)."""

    machine: Literal['pc', 'q35'] = 'q35'
    ram_mib: int = 256
    vmcoreinfo: bool = True      # -device vmcoreinfo
    fw_cfg_module: bool = True   # init loads qemu_fw_cfg (so the kernel writes etc/vmcoreinfo)
    append: str = 'console=ttyS0 panic=-1'

    @property
    def ram_bytes(self) -> int:
        return self.ram_mib * MIB

    @property
    def publishes_vmcoreinfo(self) -> bool:
        return self.vmcoreinfo and self.fw_cfg_module


LINUX_Q35_VMCOREINFO = LinuxRecipe()


@dataclasses.dataclass(frozen=True)
class LinuxGuestImages:
    """The cached files of one built ``LinuxRecipe``.

    ``dump_head`` is the start of QEMU's ``dump-guest-memory`` (ELF, no paging) of
    the original guest, stopped just before it was saved: ELF header, section and
    program headers and the whole PT_NOTE segment, up to the first PT_LOAD's data.
    The build proved that QEMUs restoring ``sequential`` and ``mapped_ram`` dump
    byte-identical files (see ``dump_restored``).
    """

    recipe: LinuxRecipe
    directory: Path
    kernel: Path
    initrd: Path
    sequential: Path
    mapped_ram: Path
    dump_head: Path
    recipe_json: Path

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.recipe_json.read_text())

    def machine_args(self, serial: str = 'null') -> MachineArgs:
        return linux_machine_args(self.recipe, self.kernel, self.initrd, serial)


def linux_machine_args(recipe: LinuxRecipe, kernel: Path, initrd: Path,
                       serial: str = 'null') -> MachineArgs:
    """The guest's command line. QEMUs restoring its images get the same one (the
    -kernel option ROM is a RAM block of its own, the serial port has migrated
    state), with the serial port's backend ``null``."""
    args = ('-accel', 'tcg', '-cpu', 'qemu64',
            '-machine', recipe.machine, '-m', '%dM' % recipe.ram_mib, '-smp', '1',
            '-nodefaults', '-no-user-config', '-display', 'none',
            '-kernel', os.fspath(kernel), '-initrd', os.fspath(initrd),
            '-append', recipe.append, '-serial', serial)
    if recipe.vmcoreinfo:
        args += ('-device', 'vmcoreinfo')
    return MachineArgs(args=args, ram_bytes=recipe.ram_bytes)


def linux_cache_key(recipe: LinuxRecipe) -> str:
    material = '\n'.join([repr(recipe), qemu_version(), LINUX_INIT,
                          'linux generator %d' % LINUX_GENERATOR_VERSION])
    return hashlib.sha256(material.encode()).hexdigest()


def linux_cache_dir(recipe: LinuxRecipe) -> Path:
    return cache_root() / ('linux-%s' % linux_cache_key(recipe)[:16])


def _linux_images_in(directory: Path, recipe: LinuxRecipe) -> LinuxGuestImages:
    return LinuxGuestImages(recipe=recipe, directory=directory,
                            **{field: directory / name for field, name in LINUX_FILES.items()})


def _linux_is_complete(images: LinuxGuestImages) -> bool:
    return (images.directory / DONE_MARKER).is_file() and all(
        getattr(images, field).is_file() for field in LINUX_FILES)


def build_linux(recipe: LinuxRecipe = LINUX_Q35_VMCOREINFO) -> LinuxGuestImages:
    """The images of a Linux guest, built on a cache miss (as ``build`` does for
    firmware recipes: temporary sibling directory, renamed when DONE, flock)."""
    final = linux_cache_dir(recipe)
    images = _linux_images_in(final, recipe)
    _build_cached(final, lambda: _linux_is_complete(images), lambda work: _build_linux_into(work, recipe))
    return images


def _run_tool(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                                timeout=APT_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise QemuError('%s is not installed (the Linux test guest is built from Debian '
                        'packages)' % argv[0]) from exc
    if result.returncode:
        raise QemuError('%s failed (exit %d); the Linux test guest needs Debian 12 package '
                        'lists (apt-get update, as scripts/install-deps.sh does): %s'
                        % (' '.join(argv), result.returncode, result.stderr.strip()[-2000:]))
    return result.stdout


def kernel_package() -> str:
    """The versioned kernel package Debian's linux-image-amd64 depends on."""
    out = _run_tool(['apt-cache', 'depends', '--important', KERNEL_METAPACKAGE])
    for line in out.splitlines():
        key, _, value = line.strip().partition(':')
        if key.strip('|') == 'Depends' and value.strip().startswith('linux-image-'):
            return value.strip()
    raise QemuError('apt-cache depends %s names no linux-image- package:\n%s'
                    % (KERNEL_METAPACKAGE, out))


def _apt_download(package: str, directory: Path) -> Path:
    _run_tool(['apt-get', 'download', package], cwd=directory)
    debs = sorted(directory.glob(package + '_*.deb'))
    if len(debs) != 1:
        raise QemuError('apt-get download %s left %s in %s' % (package, debs, directory))
    return debs[0]


def _deb_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a .deb whose paths ``wanted`` accepts, read in one
    stream (dpkg-deb --fsys-tarfile): nothing else of the package is unpacked."""
    out: dict[str, bytes] = {}
    with subprocess.Popen(['dpkg-deb', '--fsys-tarfile', os.fspath(deb)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode='r|') as tar:
            for member in tar:
                name = member.name.lstrip('.').lstrip('/')
                if member.isfile() and wanted(name):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    out[name] = handle.read()
        stderr = proc.stderr.read() if proc.stderr else b''
    if proc.returncode:
        raise QemuError('dpkg-deb --fsys-tarfile %s failed: %s' % (deb, stderr.decode(errors='replace')))
    return out


def _module_bytes(name: str, data: bytes) -> bytes:
    """A kernel module as busybox insmod takes it: uncompressed."""
    if name.endswith('.ko'):
        return data
    if name.endswith('.ko.xz'):
        return lzma.decompress(data)
    if name.endswith('.ko.gz'):
        return gzip.decompress(data)
    if name.endswith('.ko.zst'):
        return subprocess.run(['zstd', '-dc'], input=data, capture_output=True, check=True,
                              timeout=APT_TIMEOUT).stdout
    raise QemuError('unknown kernel module compression: %s' % name)


def _modinfo(module: bytes, key: str) -> str | None:
    """A ``key=value`` string of the module's .modinfo section (found by content)."""
    needle = b'\0' + key.encode() + b'='
    at = module.find(needle)
    if at < 0:
        return None
    end = module.index(b'\0', at + 1)
    return module[at + len(needle):end].decode()


def newc_archive(entries: Sequence[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as initramfs.

    ``entries``: (path without leading slash, st_mode, data (a symlink's target),
    (major, minor) of a device node). Owner root, mtime 0.
    """
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b'\0'
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b'070701' + b''.join(b'%08X' % v for v in fields) + encoded)
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(ino, name, mode, data, rdev)
    add(0, 'TRAILER!!!', 0, b'', (0, 0))
    return bytes(out)


def _make_boot_files(directory: Path, recipe: LinuxRecipe, scratch: Path) -> dict[str, Any]:
    """Write the kernel and the initramfs into ``directory``; return what went in."""
    debs = scratch / 'debs'
    debs.mkdir()
    kpkg = kernel_package()
    kdeb = _apt_download(kpkg, debs)
    bdeb = _apt_download(BUSYBOX_PACKAGE, debs)
    module_names = tuple('/%s.ko%s' % (FW_CFG_MODULE, ext) for ext in ('', '.xz', '.gz', '.zst'))
    kfiles = _deb_members(kdeb, lambda n: (n.startswith('boot/vmlinuz-')
                                           or (n.startswith('lib/modules/') and n.endswith(module_names))))
    kernels = [n for n in kfiles if n.startswith('boot/vmlinuz-')]
    modules = [n for n in kfiles if n.startswith('lib/modules/')]
    if len(kernels) != 1 or len(modules) != 1:
        raise QemuError('%s: expected one boot/vmlinuz-* and one %s module, found %s'
                        % (kdeb.name, FW_CFG_MODULE, sorted(kfiles)))
    busybox = _deb_members(bdeb, lambda n: n == 'bin/busybox').get('bin/busybox')
    if busybox is None:
        raise QemuError('%s has no bin/busybox' % bdeb.name)
    module = _module_bytes(modules[0], kfiles[modules[0]])
    depends = _modinfo(module, 'depends')
    if depends:  # none for Debian 12's; loading them too is not implemented
        raise QemuError('%s depends on %s' % (modules[0], depends))
    insmod = '/bin/busybox insmod /%s.ko' % FW_CFG_MODULE if recipe.fw_cfg_module else ':'
    init = LINUX_INIT % {'insmod': insmod, 'marker': LINUX_READY_MARKER}
    directory_mode, file_mode, exe_mode = 0o40755, 0o100644, 0o100755
    entries = [('dev', directory_mode, b'', (0, 0)),
               ('dev/console', 0o20600, b'', (5, 1)),  # the kernel opens it for init's stdio
               ('bin', directory_mode, b'', (0, 0)),
               ('bin/busybox', exe_mode, busybox, (0, 0)),
               ('bin/sh', 0o120777, b'busybox', (0, 0)),
               ('proc', directory_mode, b'', (0, 0)),
               ('sys', directory_mode, b'', (0, 0)),
               ('init', exe_mode, init.encode(), (0, 0)),
               ('%s.ko' % FW_CFG_MODULE, file_mode, module, (0, 0))]
    (directory / LINUX_FILES['kernel']).write_bytes(kfiles[kernels[0]])
    (directory / LINUX_FILES['initrd']).write_bytes(newc_archive(entries))
    shutil.rmtree(debs)
    return {'kernel_deb': kdeb.name, 'busybox_deb': bdeb.name, 'kernel': kernels[0],
            'module': modules[0], 'module_vermagic': _modinfo(module, 'vermagic')}


def wait_for_serial(qemu: QemuProcess, serial: Path, marker: str, timeout: float) -> str:
    """Poll the guest's serial log until a line contains ``marker``; return that line."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            for line in serial.read_bytes().decode('utf-8', 'replace').splitlines():
                if marker in line:
                    return line
        if qemu.process.poll() is not None:
            raise QemuError('the guest exited before printing %r\n%s' % (marker, qemu.describe()))
        if time.monotonic() > deadline:
            tail = serial.read_bytes()[-STDERR_TAIL_BYTES:].decode('utf-8', 'replace') \
                if serial.exists() else '(no serial output)'
            raise QemuTimeoutError('no %r on the serial console after %.0f s; it ends with:\n%s'
                                   % (marker, timeout, tail))
        time.sleep(POLL_INTERVAL * 4)


def dump_guest_memory(qemu: QemuProcess, path: str | os.PathLike[str]) -> Path:
    """QMP dump-guest-memory, ELF, no paging (the layout ramfs's core.elf follows)."""
    previous = qemu.qmp.command_timeout
    qemu.qmp.command_timeout = max(previous, GUEST_DUMP_TIMEOUT)
    try:
        qemu.qmp.execute('dump-guest-memory', {'paging': False,
                                               'protocol': 'file:%s' % os.path.abspath(path)})
    finally:
        qemu.qmp.command_timeout = previous
    return Path(path)


def elf_dump_head(path: str | os.PathLike[str]) -> bytes:
    """The start of an ELF64 core up to the first PT_LOAD's data: headers and notes."""
    with open(path, 'rb') as f:
        ehdr = f.read(64)
        if ehdr[:5] != b'\x7fELF\x02':
            raise QemuError('%s is not an ELF64 file' % path)
        phoff, = struct.unpack_from('<Q', ehdr, 32)
        phnum, = struct.unpack_from('<H', ehdr, 56)
        f.seek(phoff)
        phdrs = f.read(56 * phnum)
        loads = [struct.unpack_from('<Q', phdrs, 56 * i + 8)[0] for i in range(phnum)
                 if struct.unpack_from('<I', phdrs, 56 * i)[0] == 1]
        end = min(loads) if loads else os.fstat(f.fileno()).st_size
        f.seek(0)
        return f.read(end)


def dump_restored(images: LinuxGuestImages, image: Path, capabilities: Sequence[str],
                  out_path: str | os.PathLike[str]) -> Path:
    """Restore ``image`` in a fresh, never-started QEMU and dump-guest-memory it to
    ``out_path`` (as big as RAM: the caller deletes it)."""
    args = images.machine_args()
    with _scratch_dir() as scratch, _start(args, scratch, 'dump', incoming=True) as qemu:
        qemu.load(image, capabilities)
        return dump_guest_memory(qemu, out_path)


def _has_vmcoreinfo_note(head: bytes) -> bool:
    return b'VMCOREINFO\0' in head and b'OSRELEASE=' in head


def _build_linux_into(directory: Path, recipe: LinuxRecipe) -> None:
    started = time.monotonic()
    images = _linux_images_in(directory, recipe)
    steps: dict[str, float] = {}

    def step_done(name: str, since: float) -> float:
        now = time.monotonic()
        steps[name] = round(now - since, 3)
        return now

    source_dump = directory / 'source.elf'  # as big as RAM: removed below
    check_dump = directory / 'check.elf'
    with _scratch_dir() as scratch:
        t = time.monotonic()
        packages = _make_boot_files(directory, recipe, scratch)
        t = step_done('download packages + kernel + initramfs', t)

        # 1. The original guest: boot to the marker, stop, QEMU's dump, sequential save.
        serial = scratch / 'serial.log'
        args = linux_machine_args(recipe, images.kernel, images.initrd,
                                  serial='file:' + os.fspath(serial))
        with _start(args, scratch, 'source') as source:
            ready = wait_for_serial(source, serial, LINUX_READY_MARKER, LINUX_BOOT_TIMEOUT)
            t = step_done('boot', t)
            source.qmp.execute('stop')
            kvm = source.qmp.execute('query-kvm')
            machine_type = source.qmp.execute('qom-get', path='/machine', property='type')
            dump_guest_memory(source, source_dump)
            source.save(images.sequential)
        boot_log = serial.read_bytes().decode('utf-8', 'replace')
        t = step_done('source dump + sequential save', t)
        want = 'fw_cfg-vmcoreinfo=%s' % ('yes' if recipe.publishes_vmcoreinfo else 'no')
        if want not in ready:
            raise QemuError('the guest said %r, expected %r\n%s' % (ready, want, boot_log[-4000:]))
        head = elf_dump_head(source_dump)
        if _has_vmcoreinfo_note(head) != recipe.publishes_vmcoreinfo:
            raise QemuError('QEMU\'s dump of %r %s a VMCOREINFO note' % (
                recipe, 'lacks' if recipe.publishes_vmcoreinfo else 'has'))
        images.dump_head.write_bytes(head)

        # 2. mapped-ram from a fresh QEMU that restored the sequential image; its
        #    dump must equal the original's byte for byte.
        with _start(images.machine_args(), scratch, 'resave', incoming=True) as resave:
            resave.load(images.sequential)
            dump_guest_memory(resave, check_dump)
            _check_same(check_dump, source_dump, 'QEMU\'s dump after restoring %s'
                        % images.sequential.name)
            resave.save(images.mapped_ram, MAPPED_RAM_CAPABILITIES)
        t = step_done('restore + dump + mapped-ram save', t)

        # 3. The mapped-ram image restores to the same dump.
        dump_restored(images, images.mapped_ram, MAPPED_RAM_CAPABILITIES, check_dump)
        _check_same(check_dump, source_dump, 'QEMU\'s dump after restoring %s'
                    % images.mapped_ram.name)
        t = step_done('verify ' + images.mapped_ram.name, t)
    source_dump.unlink()
    check_dump.unlink()

    info = {
        'linux_generator_version': LINUX_GENERATOR_VERSION,
        'qemu_version': qemu_version(),
        'cache_key': linux_cache_key(recipe),
        'recipe': dataclasses.asdict(recipe),
        'ram_bytes': recipe.ram_bytes,
        'machine_type': machine_type,
        'accelerator': 'kvm' if kvm.get('enabled') else 'tcg',
        'packages': packages,
        'ready_line': ready.strip(),
        'capabilities': {LINUX_FILES['sequential']: [],
                         LINUX_FILES['mapped_ram']: list(MAPPED_RAM_CAPABILITIES)},
        'build_seconds': round(time.monotonic() - started, 3),
        'build_steps_seconds': steps,
        'built_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }
    images.recipe_json.write_text(json.dumps(info, indent=1) + '\n')
    (directory / DONE_MARKER).write_text('done\n')


# ------------------------------------------------- the Linux guest as libvirt saves it
#
# libvirt's save images of the ``build_linux`` guest, made without libvirt (and
# without ramfs): virQEMUSaveHeader, the domain XML and the cookie as libvirt 11.3
# writes them (qemu_saveimage.c virQEMUSaveDataWrite: XML, NUL, cookie, NUL, then
# QEMU_SAVE_PADDING zero bytes), then the QEMU stream at 92 + data_len, unaligned.
# ``raw`` (format 0) wraps the sequential stream byte for byte; ``sparse`` (format 6)
# holds a mapped-ram stream that QEMU itself wrote at that offset (migrate to
# file:PATH,offset=N truncates the file to N and keeps the header, as libvirt's fd
# does), whose page offsets are therefore absolute file offsets as in real images.
# ``pmemsave`` is pc.ram's ground truth: [0, ram) of a QEMU that restored the
# sequential stream (build_linux proved such a restore byte-exact). Every image is
# restored once by QEMU and compared with it before the set counts as built.

LINUX_LIBVIRT_VERSION = 1
LIBVIRT_SAVE_MAGIC = b'LibvirtQemudSave'
LIBVIRT_SAVE_VERSION = 2
LIBVIRT_SAVE_HEADER_SIZE = 92          # sizeof(virQEMUSaveHeader)
LIBVIRT_SAVE_PADDING = 64 * 1024       # QEMU_SAVE_PADDING... zeros after XML and cookie
LIBVIRT_FORMAT_RAW = 0
LIBVIRT_FORMAT_SPARSE = 6

LINUX_LIBVIRT_FILES = {
    'raw': 'libvirt-raw.img',
    'sparse': 'libvirt-sparse.img',
    'pmemsave': 'pmemsave.bin',
    'domain_xml': 'domain.xml',
}


@dataclasses.dataclass(frozen=True)
class LinuxLibvirtImages:
    """libvirt raw and sparse images of one ``build_linux`` guest, and its pc.ram truth."""

    guest: LinuxGuestImages
    directory: Path
    raw: Path
    sparse: Path
    pmemsave: Path
    domain_xml: Path

    @property
    def stream_offset(self) -> int:
        """Where the QEMU stream starts in ``raw`` and ``sparse``."""
        with open(self.raw, 'rb') as f:
            return LIBVIRT_SAVE_HEADER_SIZE + struct.unpack_from('<I', f.read(24), 20)[0]


def bzimage_release(kernel: str | os.PathLike[str]) -> str:
    """The kernel release (``uname -r``) from a bzImage's setup header: the string its
    ``kernel_version`` field (at 0x20e) points to, minus 0x200, up to the first space."""
    with open(kernel, 'rb') as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b'HdrS':
        raise QemuError('%s is not a bzImage (no HdrS setup header)' % kernel)
    pointer, = struct.unpack_from('<H', head, 0x20E)
    text = head[pointer + 0x200:head.index(b'\0', pointer + 0x200)].decode()
    return text.split(' ', 1)[0]


def machine_vcpus(args: MachineArgs) -> int:
    """The number of vCPUs of a guest command line (its -smp)."""
    return int(args.args[args.args.index('-smp') + 1].split(',')[0].removeprefix('cpus='))


def linux_domain_xml(images: LinuxGuestImages) -> str:
    """A domain XML such as libvirt keeps in the save image of this guest (TCG, the
    machine type QEMU resolved, its RAM, vCPUs, kernel, initrd and command line)."""
    from xml.sax.saxutils import escape
    machine = images.info['machine_type'].removesuffix('-machine')
    kib = images.recipe.ram_bytes // 1024
    return ("<domain type='qemu'>\n"
            "  <name>ramfs-test-linux-%s</name>\n"
            "  <uuid>52414d46-5346-4958-0003-000000000001</uuid>\n"
            "  <memory unit='KiB'>%d</memory>\n"
            "  <currentMemory unit='KiB'>%d</currentMemory>\n"
            "  <vcpu placement='static'>%d</vcpu>\n"
            "  <os>\n"
            "    <type arch='x86_64' machine='%s'>hvm</type>\n"
            "    <kernel>%s</kernel>\n"
            "    <initrd>%s</initrd>\n"
            "    <cmdline>%s</cmdline>\n"
            "  </os>\n"
            "  <cpu mode='custom' match='exact' check='none'>\n"
            "    <model fallback='forbid'>qemu64</model>\n"
            "  </cpu>\n"
            "  <clock offset='utc'/>\n"
            "  <devices>\n"
            "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
            "    <serial type='null'>\n"
            "      <target type='isa-serial' port='0'/>\n"
            "    </serial>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n"
            "</domain>\n"
            % (images.recipe.machine, kib, kib, machine_vcpus(images.machine_args()), escape(machine),
               escape(os.fspath(images.kernel)), escape(os.fspath(images.initrd)),
               escape(images.recipe.append)))


LINUX_LIBVIRT_COOKIE = ("<cookie>\n"
                        "  <cpu mode='custom' match='exact' check='full'>\n"
                        "    <model fallback='forbid'>qemu64</model>\n"
                        "  </cpu>\n"
                        "</cookie>\n")


def libvirt_save_header(xml: str, save_format: int, cookie: str | None = LINUX_LIBVIRT_COOKIE,
                        was_running: bool = False) -> bytes:
    """virQEMUSaveHeader and its data area, as libvirt writes them (the QEMU stream
    follows at the returned length)."""
    data = xml.encode() + b'\0'
    cookie_offset = 0
    if cookie is not None:
        cookie_offset = len(data)
        data += cookie.encode() + b'\0'
    data += bytes(LIBVIRT_SAVE_PADDING)
    header = struct.pack('<16s5I14I', LIBVIRT_SAVE_MAGIC, LIBVIRT_SAVE_VERSION, len(data),
                         int(was_running), save_format, cookie_offset, *([0] * 14))
    assert len(header) == LIBVIRT_SAVE_HEADER_SIZE
    return header + data


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy leaving zero pages as holes (the pmemsave of a mostly empty guest)."""
    zero = bytes(PAGE_SIZE)
    with open(src, 'rb') as fin, open(dst, 'wb') as fout:
        while chunk := fin.read(MIB):
            for off in range(0, len(chunk), PAGE_SIZE):
                page = chunk[off:off + PAGE_SIZE]
                if page == zero[:len(page)]:
                    fout.seek(len(page), os.SEEK_CUR)
                else:
                    fout.write(page)
        fout.truncate()


def linux_libvirt_cache_dir(recipe: LinuxRecipe) -> Path:
    return cache_root() / ('linux-%s-libvirt-%d' % (linux_cache_key(recipe)[:16], LINUX_LIBVIRT_VERSION))


def _linux_libvirt_in(directory: Path, guest: LinuxGuestImages) -> LinuxLibvirtImages:
    return LinuxLibvirtImages(guest=guest, directory=directory,
                              **{field: directory / name for field, name in LINUX_LIBVIRT_FILES.items()})


def _linux_libvirt_is_complete(images: LinuxLibvirtImages) -> bool:
    return (images.directory / DONE_MARKER).is_file() and all(
        getattr(images, field).is_file() for field in LINUX_LIBVIRT_FILES)


def build_linux_libvirt(recipe: LinuxRecipe = LINUX_Q35_VMCOREINFO) -> LinuxLibvirtImages:
    """The libvirt raw and sparse images of ``build_linux(recipe)`` and its pc.ram
    truth, built on a cache miss (temporary sibling directory, renamed when DONE, flock)."""
    guest = build_linux(recipe)
    final = linux_libvirt_cache_dir(recipe)
    images = _linux_libvirt_in(final, guest)
    _build_cached(final, lambda: _linux_libvirt_is_complete(images),
                  lambda work: _build_linux_libvirt_into(work, guest))
    return images


def _build_linux_libvirt_into(directory: Path, guest: LinuxGuestImages) -> None:
    images = _linux_libvirt_in(directory, guest)
    args = guest.machine_args()
    xml = linux_domain_xml(guest)
    images.domain_xml.write_text(xml)
    truth = directory / 'pmemsave.full'  # as big as RAM: removed below
    check = directory / 'check.full'
    with open(images.raw, 'wb') as out, open(guest.sequential, 'rb') as src:
        out.write(libvirt_save_header(xml, LIBVIRT_FORMAT_RAW))
        shutil.copyfileobj(src, out, 16 * MIB)
    sparse_head = libvirt_save_header(xml, LIBVIRT_FORMAT_SPARSE)
    images.sparse.write_bytes(sparse_head)
    try:
        with _scratch_dir() as scratch, _start(args, scratch, 'libvirt', incoming=True) as qemu:
            qemu.load(guest.sequential)
            qemu.pmemsave(args.ram_bytes, truth)
            qemu.set_capabilities(MAPPED_RAM_CAPABILITIES)
            qemu.set_parameters(max_bandwidth=MAX_BANDWIDTH)
            qemu.qmp.execute('migrate', uri=_file_uri(images.sparse, len(sparse_head)))
            qemu.wait_for_migration('save to %s' % images.sparse)
        with open(images.sparse, 'rb') as f:
            if f.read(len(sparse_head)) != sparse_head:
                raise QemuError('QEMU overwrote the libvirt header of %s' % images.sparse)
        for image, capabilities in ((images.raw, ()), (images.sparse, MAPPED_RAM_CAPABILITIES)):
            restore_and_dump(image, args, capabilities=capabilities, offset=len(sparse_head),
                             out_path=check)
            _check_same(check, truth, 'QEMU\'s pmemsave after restoring %s' % image.name)
        _copy_sparse(truth, images.pmemsave)
    finally:
        truth.unlink(missing_ok=True)
        check.unlink(missing_ok=True)
    for path in (images.raw, images.sparse, images.pmemsave):
        path.chmod(0o444)
    (directory / DONE_MARKER).write_text('done\n')
