"""Shared fixtures: sized tmpfs datadirs and a real fusestore mount over them.

Every mount is made by running the ``fusestore`` program as a user would and
is always unmounted in the fixture's finaliser (``fusermount3 -u``, then
``-uz`` as a last resort). A watchdog kills a daemon that outlives the test
timeout: killing it aborts the FUSE connection, so a test blocked in a system
call on the mount fails with ENOTCONN instead of hanging the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusestore.admin import status
from fusestore.pool.closer import CLOSER_NAME

# The datadir that fails on demand (tests/faulty.py) is a fixture for every test.
pytest_plugins = ["tests.faulty"]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
TmpfsFactory = Callable[[str, int], Path]
MountFactory = Callable[..., "MountedPool"]
MOUNT_WAIT_SECONDS = 15
# The transport every daemon the tests start is given explicitly, unless the
# test names one itself: never the default "auto", whose probe would add a
# fraction of a second to each of the suite's mounts (tests/service/
# test_transport.py tests auto). "devfuse" (scripts/test's second run):
# /dev/fuse; otherwise io_uring where the kernel has it.
TRANSPORT = os.environ.get("FUSESTORE_TEST_TRANSPORT", "default")
_COMMANDS = ("mount", "status", "check", "verify", "drain", "balance")
WATCHDOG_SECONDS = 110  # a little under the pytest-timeout in pyproject.toml
_TRANSPORT_KEY = re.compile(r"^\s*(transport|no_io_uring)\s*=", re.MULTILINE)


def run_transport() -> str:
    """The transport of this run's daemons: devfuse or io_uring."""
    if TRANSPORT == "devfuse" or not Path("/sys/module/fuse/parameters/enable_uring").exists():
        return "devfuse"
    return "io_uring"


def _names_transport(args: Sequence[str]) -> bool:
    """Whether a mount's arguments choose the transport themselves (flags, -o,
    or a config file that sets it)."""
    for index, arg in enumerate(args):
        if arg.startswith(("--transport", "--no-io-uring")):
            return True
        if index and args[index - 1] == "-o" and re.search(r"(^|,)(transport=|no_io_uring)", arg):
            return True
        config = args[index + 1] if arg == "--config" and index + 1 < len(args) else None
        if index == 0 and arg not in _COMMANDS:
            config = arg  # mount(8)'s SOURCE, a config file or datadirs
        if config and os.path.isfile(config):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if _TRANSPORT_KEY.search(Path(config).read_text()):
                    return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the /dev/fuse run, skip the tests marked ``one_transport``: the
    default run has them, and their minute would come twice (CI's budget)."""
    if TRANSPORT != "devfuse":
        return
    skip = pytest.mark.skip(reason="one_transport: run in the default transport's run only")
    for item in items:
        if item.get_closest_marker("one_transport"):
            item.add_marker(skip)


def fusestore_command(*args: str) -> list[str]:
    """The fusestore CLI of the interpreter running the tests; a mount in the
    run's transport (:func:`run_transport`) unless it names one."""
    command = [sys.executable, "-m", "fusestore", *args]
    if not args or "--help" in args or _names_transport(args):
        return command
    if args[0] == "mount":
        command += ["--transport", run_transport()]
    elif args[0] not in _COMMANDS and not args[0].startswith("-") and len(args) >= 2:
        command += ["-o", f"transport={run_transport()}"]  # the mount(8) form
    return command


def run_fusestore(
    *args: str, timeout: float = 30, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fusestore_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def is_mounted(path: Path) -> bool:
    return mount_fields(path) is not None


def mount_fields(path: Path) -> list[str] | None:
    """The /proc/self/mounts line of the mount at ``path`` (source, target,
    type, options, ...), or None if nothing is mounted there."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split(" ")
        if fields[1:2] == [str(path)]:
            return fields
    return None


def mount_options(path: Path) -> list[str]:
    """The options of the mount at ``path``, as /proc/self/mounts lists them."""
    fields = mount_fields(path)
    if fields is None:
        raise AssertionError(f"{path} is not mounted")
    return fields[3].split(",")


def mounted_source(path: Path) -> str:
    """The source of the mount at ``path``, as findmnt shows it (escapes undone)."""
    return subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def force_unmount(path: Path) -> None:
    """fusermount3 -u, then lazily as a last resort; never raises."""
    for flags in ("-u", "-uz"):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", flags, str(path)], capture_output=True, check=False)
        for _ in range(50):
            if not is_mounted(path):
                return
            time.sleep(0.1)


# An unprivileged user (nobody), without supplementary groups or capabilities.
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


def run_as_nobody(*command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as uid/gid 65534; never raises on failure."""
    return subprocess.run(
        [*AS_NOBODY, *command], capture_output=True, text=True, timeout=timeout, check=False
    )


def mount_env() -> dict[str, str]:
    """mount.fuse3 finds ``fusestore`` on PATH, as it would in /usr/local/bin."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent!s}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }


def write_config(path: Path, **settings: object) -> Path:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def has_exited(pid: int) -> bool:
    """Whether the process is gone or a zombie (a daemon that went to the
    background is reaped by init, which may take its time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_for_exit(pid: int, seconds: float = 20) -> bool:
    """Wait until the process has exited; False if it has not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not has_exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_for_log(log_file: Path, text: str, count: int = 1, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log_file.exists() and log_file.read_text().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} time(s):\n{log_file.read_text()}")


def incoming_files(datadir: Datadir) -> list[Path]:
    """Files being written (or left over) in a datadir's private area."""
    root = datadir.path / ".fusestore" / "incoming"
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def kept_files(datadir: Datadir) -> list[Path]:
    kept = datadir.path / ".fusestore" / "kept"
    return sorted(kept.iterdir()) if kept.exists() else []


def used_bytes(datadir: Datadir) -> int:
    vfs = os.statvfs(datadir.path)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def dd(target: Path, size_mib: int, source: str = "/dev/urandom") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dd", f"if={source}", f"of={target}", "bs=1M", f"count={size_mib}", "status=none"],
        capture_output=True,
        text=True,
        check=False,
    )


def daemon_pid(mountpoint: Path) -> int:
    return int(status.read(str(mountpoint))["pid"])


def errno_of(call: Callable[..., object], *args: object) -> int:
    """The errno of the OSError ``call(*args)`` raises (the test fails if it raises none)."""
    with pytest.raises(OSError) as caught:
        call(*args)
    return caught.value.errno


def files_below(path: Path) -> dict[str, bytes]:
    """Every regular file below a datadir, its private area included, but the
    mark and lock files: what a datadir holds of the pool's data."""
    found = {}
    for root, _, names in os.walk(path):
        for name in names:
            file = Path(root) / name
            relative = str(file.relative_to(path))
            if relative == ".fusestore/mark" or relative.endswith(".lock"):
                continue
            found[relative] = file.read_bytes()
    return found


def eventually(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Whether ``check()`` becomes true within ``seconds`` (polled: a bounded wait)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def open_path_to(path: Path) -> None:
    """Let other users traverse to ``path`` (pytest's temporary root is 0700)."""
    for parent in path.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o755)


@dataclass
class Datadir:
    path: Path
    priority: int = 0

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.priority}"

    def names(self) -> set[str]:
        """Regular files at the top of the datadir, as the pool sees them."""
        return {p.name for p in self.path.iterdir() if p.is_file() and not p.is_symlink()}


@dataclass
class MountedPool:
    """A running ``fusestore mount -f`` and what it was started with."""

    mountpoint: Path
    datadirs: list[Datadir]
    process: subprocess.Popen[bytes]
    log_path: Path
    _watchdog: threading.Timer | None = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def holders(self, name: str) -> list[Path]:
        """The datadirs that hold a regular file called ``name``."""
        return [d.path for d in self.datadirs if name in d.names()]

    def unmount(self, timeout: float = 20) -> int:
        """Unmount with fusermount3 -u and return the daemon's exit status."""
        force_unmount(self.mountpoint)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        force_unmount(self.mountpoint)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[TmpfsFactory]:
    """``tmpfs(name, size_mib)`` mounts a tmpfs of that size and returns its path."""
    mounted: list[Path] = []

    def make(name: str, size_mib: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], check=True
        )
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        unmount_datadir(path)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``ramfs(name)`` mounts a ramfs, a filesystem that keeps no user extended
    attributes (so no checksums); unmounted at teardown. Request it before
    ``mount_pool`` when a pool uses it, so that the pool is unmounted first."""
    mounted: list[Path] = []

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        unmount_datadir(path)


def unmount_datadir(path: Path, seconds: float = 5) -> None:
    """Unmount a datadir's filesystem, retrying while a daemon that is ending
    still holds it, lazily only as a last resort; never raises."""
    deadline = time.monotonic() + seconds
    while is_mounted(path):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
                return
            time.sleep(0.05)


def remount(path: Path, mode: str) -> None:
    """Remount the filesystem at ``path`` (``ro``, ``rw``), retrying while busy.

    FUSE sends RELEASE after close() has returned, so the daemon may hold
    a just-closed file open for writing a moment longer, and a filesystem
    refuses a read-only remount until it lets go.
    """
    command = ["mount", "-o", f"remount,{mode}", str(path)]
    deadline = time.monotonic() + 10
    while True:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        if "busy" not in result.stderr or time.monotonic() > deadline:
            raise AssertionError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        time.sleep(0.05)


class Ext4Disk:
    """A loop-mounted ext4 image: a real disk that can fail, go read-only or vanish."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path

    def mount(self, *options: str) -> None:
        opts = ",".join(("loop", *options))
        subprocess.run(["mount", "-o", opts, str(self.image), str(self.path)], check=True)

    def remount(self, mode: str) -> None:
        remount(self.path, mode)

    def unmount(self) -> None:
        """Lazily, as a disk yanked from under a running daemon would go."""
        subprocess.run(["umount", "-l", str(self.path)], check=True)


# How each kind of loop-mounted disk is made (btrfs: for reflinks).
_MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-m", "0"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Callable[..., Ext4Disk]]:
    """``ext4(name, size_mib, fstype="ext4")`` makes and mounts a disk image
    (ext4, or ``"btrfs"``); unmounted at teardown."""
    disks: list[Ext4Disk] = []

    def make(name: str, size_mib: int, fstype: str = "ext4") -> Ext4Disk:
        image = tmp_path / f"{name}.{fstype}"
        with image.open("wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run([*_MKFS[fstype], str(image)], check=True, capture_output=True)
        path = tmp_path / name
        path.mkdir()
        disk = Ext4Disk(image, path)
        disk.mount()
        if fstype == "ext4":
            (path / "lost+found").rmdir()  # a fresh datadir, as an admin would prepare it
        disks.append(disk)
        return disk

    yield make
    for disk in reversed(disks):
        unmount_datadir(disk.path)


def start_mount(
    mountpoint: Path,
    datadirs: Sequence[Datadir],
    *extra_args: str,
    log_path: Path,
) -> MountedPool:
    """Start ``fusestore mount -f`` and wait until the mount answers."""
    mountpoint.mkdir(exist_ok=True)
    args = ["mount", "-f", str(mountpoint)]
    for datadir in datadirs:
        args += ["--datadirs", datadir.spec]
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        fusestore_command(*args, *extra_args), stdout=log_file, stderr=log_file
    )
    log_file.close()
    pool = MountedPool(mountpoint, list(datadirs), process, log_path)
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while not is_mounted(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            pool.stop()
            raise RuntimeError(f"fusestore did not mount {mountpoint}:\n{pool.log()}")
        time.sleep(0.05)
    os.stat(mountpoint)  # the first request completes FUSE's handshake
    # The daemon is ready once its own check has answered; what it logs
    # after that belongs to the test.
    if not eventually(lambda: "INFO ready: " in pool.log(), MOUNT_WAIT_SECONDS):
        pool.stop()
        raise RuntimeError(f"fusestore never logged that {mountpoint} is ready:\n{pool.log()}")
    pool._watchdog = threading.Timer(WATCHDOG_SECONDS, _kill, args=(process,))
    pool._watchdog.daemon = True
    pool._watchdog.start()
    return pool


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)


def is_closer(entry: Path) -> bool:
    """Whether /proc/PID is a daemon's closer process (fusestore/pool/closer.py):
    it has the daemon's command line but serves nothing, and ends by itself
    right after its daemon (say one a test has just killed)."""
    try:
        return (entry / "comm").read_bytes().rstrip(b"\n") == CLOSER_NAME
    except OSError:
        return False


def processes_naming(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (such as a daemon serving
    it), closers aside."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or is_closer(entry):
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if os.fsencode(path) in command_line.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def mountpoint(
    tmp_path: Path, tmpfs: TmpfsFactory, ext4: Callable[[str, int], Ext4Disk]
) -> Iterator[Path]:
    """An empty directory to mount on by hand; unmounted at teardown whatever happened.

    Depends on ``tmpfs`` and ``ext4`` so that the pool is unmounted, and its
    daemon gone, before the datadirs under it are.
    """
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)
    for pid in processes_naming(path):
        if not wait_for_exit(pid, seconds=10):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mount_pool(
    tmp_path: Path, tmpfs: TmpfsFactory, ext4: Callable[[str, int], Ext4Disk]
) -> Iterator[MountFactory]:
    """``mount_pool(datadirs, *extra_args)`` mounts them at a fresh mountpoint.

    Depends on ``tmpfs`` and ``ext4`` so that the mounts are torn down before
    the datadirs under them.
    """
    pools: list[MountedPool] = []

    def make(datadirs: Sequence[Datadir], *extra_args: str) -> MountedPool:
        index = len(pools)
        pool = start_mount(
            tmp_path / f"mnt{index}",
            datadirs,
            *extra_args,
            log_path=tmp_path / f"fusestore{index}.log",
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.stop()


@pytest.fixture
def pool(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """The reference pool: 32 and 48 MiB at priority 100, 256 MiB at 50, 16 MiB reserve."""
    datadirs = [
        Datadir(tmpfs("small", 32), 100),
        Datadir(tmpfs("medium", 48), 100),
        Datadir(tmpfs("big", 256), 50),
    ]
    return mount_pool(datadirs, "--min-free-space", "16M")


@pytest.fixture
def two_datadirs(tmpfs: TmpfsFactory) -> list[Datadir]:
    return [Datadir(tmpfs("fast", 16), 200), Datadir(tmpfs("big", 64), 100)]


@pytest.fixture
def solo(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> tuple[Datadir, MountedPool]:
    """A pool of one 16 MiB tmpfs datadir."""
    datadir = Datadir(tmpfs("solo", 16), 0)
    return datadir, mount_pool([datadir])
