"""A real GlusterFS volume for tests of one pool shared by several hosts.

Why it exists: README *One pool on several hosts* makes promises about a
pool whose datadir is a network filesystem that two daemons mount at once,
and about a server that stops answering. Only a real one shows what its
caches and its timeouts do. The ``gluster_volume`` fixture (one per test
run: creating a volume takes seconds) starts ``glusterd`` if none runs and
makes a one-brick volume on a tmpfs of its own, so that the volume can be
filled. ``gluster_clients`` mounts it twice, two *hosts* on this machine,
and gives each test a fresh directory in it; ``datadir(host)`` is that
directory as the host sees it.

A brick can be frozen (``SIGSTOP``: a server that stops answering, the
clients wait up to ``network.ping-timeout``), killed (``SIGKILL``: its
connections close, the clients fail at once with ``ENOTCONN``) and
restarted (``gluster volume start NAME force``); ``gluster_clients``
restarts it at teardown whatever the test did.

Teardown order: request ``gluster_clients`` before ``mount_pool`` (pytest
then stops the pools first); if a daemon still uses a client mount at
teardown, it is ended before the mount goes. Without root, ``/dev/fuse``
or the Debian packages ``glusterfs-server`` and ``glusterfs-client``
(``scripts/setup`` installs them) the fixtures skip, saying which; a
``glusterd`` or volume that fails to start is an error, not a skip. Test
modules import the fixtures::

    from tests.gluster import gluster_clients_fixture, gluster_volume_fixture  # noqa: F401
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import eventually, is_mounted, unmount_datadir

VOLUME_PREFIX = "fusestore-test-"
BRICK_MIB = 64
GLUSTERD_PIDFILE = Path("/run/glusterd.pid")
# The pid of a glusterd that a test run started (and a test run ends).
GLUSTERD_MARKER = Path("/run/fusestore-tests-glusterd.pid")
GLUSTERD_WAIT_SECONDS = 30
CLI_SECONDS = 60

# Seconds a client waits for a brick that stopped answering before it gives
# up on it (ENOTCONN). Gluster's default is 42. Shorter, so that a test that
# fails while a brick is frozen stalls for seconds, not a minute; long enough
# that a hang outlasts a daemon's datadir_timeout (2 s in the tests) by the
# few seconds the tests need to look at the pool while it hangs.
PING_TIMEOUT = 10

# Volume options for two clients that must see each other's changes at once
# (README *One pool on several hosts*). Each cache is per client, and
# without upcalls (features.cache-invalidation) nothing tells a client that
# another one changed a file. What each option fixed in these tests:
VOLUME_OPTIONS = {
    "network.ping-timeout": str(PING_TIMEOUT),
    # write() answered before the brick has the bytes: with it on, the write
    # that fills the volume failed with ENOSPC instead of spilling over
    # (test_gluster.py, the spill-over test): the error came back late.
    "performance.write-behind": "off",
    # md-cache keeps attributes up to md-cache-timeout (1 s): with it on, a
    # file grown on one host was read short on the other (1 run in 3), and
    # another host's rename took 1 s longer to show.
    "performance.stat-prefetch": "off",
    # A client's cache of small files' contents: with it on, a file
    # rewritten in place on one host was read as it was on the other for
    # over 1.5 s.
    "performance.quick-read": "off",
    # Already off by default (GlusterFS 10), set so that a changed default
    # does not go unnoticed: caches of contents, listings and of names that
    # do not exist, each of which would hide another host's changes.
    "performance.io-cache": "off",
    "performance.read-ahead": "off",
    "performance.readdir-ahead": "off",
    "performance.parallel-readdir": "off",
    "performance.nl-cache": "off",
}

# Client mount options. auto-invalidation: the kernel drops a file's cached
# pages when it sees the file changed; without it a file rewritten in place
# on one host was read as it was on the other for as long as its pages
# stayed cached (10 s and more). attribute-timeout=0: the kernel's cache of
# attributes (1 s by default) made a file the other host had just grown
# read short (every run).
CLIENT_OPTIONS = ("auto-invalidation=true", "attribute-timeout=0")


def gluster(*args: str, timeout: float = CLI_SECONDS) -> subprocess.CompletedProcess[str]:
    """``gluster --mode=script ARGS`` (no prompts); never raises on failure."""
    return subprocess.run(
        ["gluster", "--mode=script", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def gluster_ok(*args: str, timeout: float = CLI_SECONDS) -> str:
    """``gluster ARGS``, its output; RuntimeError naming the command if it fails."""
    result = gluster(*args, timeout=timeout)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise RuntimeError(f"gluster {' '.join(args)} failed: {output}")
    return result.stdout


def glusterd_answers() -> bool:
    try:
        return gluster("volume", "list", timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def local_hosts() -> list[str]:
    """Names or addresses of this machine a brick may be given, preferred first.

    Gluster refuses ``localhost`` and 127.0.0.1 for a brick, but takes the
    host name when it resolves to an address of this machine (even a
    loopback one, through /etc/hosts), or the machine's other addresses.
    """
    hosts = [socket.gethostname()]
    result = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
    hosts += [a for a in result.stdout.split() if ":" not in a]  # IPv4: transport inet
    return list(dict.fromkeys(hosts))


@dataclass
class GlusterVolume:
    """A started one-brick volume ``name`` with its brick ``host:brick``."""

    name: str
    host: str
    brick: Path
    workdir: Path

    @property
    def source(self) -> str:
        return f"{self.host}:/{self.name}"

    def brick_pid(self) -> int | None:
        """The brick process (glusterfsd) as glusterd knows it, None if not running."""
        output = gluster_ok("volume", "status", self.name, "--xml")
        for node in ElementTree.fromstring(output).iter("node"):
            if node.findtext("path") == str(self.brick):
                online = node.findtext("status") == "1"
                pid = int(node.findtext("pid") or "0")
                return pid if online and pid > 0 else None
        return None

    def kill_brick(self) -> None:
        """SIGKILL the brick: its connections close, clients fail at once (ENOTCONN)."""
        pid = self.brick_pid()
        assert pid is not None, f"the brick of {self.name} is not running"
        os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: _reaped(pid)), f"brick {pid} did not go"

    def freeze_brick(self) -> int:
        """SIGSTOP the brick: a server that stops answering. Clients wait for
        it up to ``PING_TIMEOUT`` seconds, then fail with ENOTCONN. Returns its pid."""
        pid = self.brick_pid()
        assert pid is not None, f"the brick of {self.name} is not running"
        os.kill(pid, signal.SIGSTOP)
        return pid

    def restart_brick(self) -> None:
        """Make sure the brick runs: a frozen one is killed first (glusterd
        takes a stopped process for a running brick), then ``gluster volume
        start NAME force`` starts a dead one.

        glusterd also takes a dead brick's pid for a running brick until the
        process is reaped (an init that reaps orphans every few seconds keeps
        it a zombie meanwhile), and then reports success without starting
        anything: so wait for the pid to go, and start again if need be.
        """
        pid = _brick_pid_from_processes(self.brick)
        if pid is not None and _stopped(pid):
            os.kill(pid, signal.SIGKILL)
        if pid is not None and not eventually(lambda: _reaped(pid), 30):
            raise RuntimeError(f"the brick process {pid} of {self.name} never went")
        for _ in range(3):
            gluster_ok("volume", "start", self.name, "force")
            if eventually(lambda: self.brick_pid() is not None, 10):
                return
        raise RuntimeError(f"the brick of {self.name} did not come back")

    def brick_answers(self) -> bool:
        """Whether the brick process is running and not stopped."""
        pid = _brick_pid_from_processes(self.brick)
        return pid is not None and _alive(pid) and not _stopped(pid)

    def mount_client(self, path: Path, log_file: Path) -> None:
        """Mount the volume at ``path``, as a host would (mount -t glusterfs)."""
        path.mkdir(parents=True, exist_ok=True)
        options = ",".join((*CLIENT_OPTIONS, f"log-file={log_file}"))
        result = subprocess.run(
            ["mount", "-t", "glusterfs", "-o", options, self.source, str(path)],
            capture_output=True,
            text=True,
            timeout=CLI_SECONDS,
            check=False,
        )
        if result.returncode != 0 or not is_mounted(path):
            log = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
            raise RuntimeError(
                f"mount -t glusterfs {self.source} {path} failed: "
                f"{(result.stdout + result.stderr).strip()}\n{log}"
            )
        os.stat(path)  # answers once the client is connected to the brick


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _reaped(pid: int) -> bool:
    """Whether the process is gone altogether, not even a zombie."""
    return not os.path.exists(f"/proc/{pid}")


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
    except OSError:
        return False


def _brick_pid_from_processes(brick: Path) -> int | None:
    """The glusterfsd serving ``brick``, found in /proc (glusterd's status
    command does not answer for a brick that is stopped)."""
    for pid in _pids_with_argument(lambda argument: argument == str(brick)):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "glusterfsd":
            return pid
    return None


def _pids_with_argument(matches: Callable[[str], bool]) -> list[int]:
    """Processes (but this one) with a command-line argument that ``matches``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            arguments = os.fsdecode((entry / "cmdline").read_bytes()).split("\0")
        except OSError:
            continue
        if any(matches(argument) for argument in arguments):
            found.append(int(entry.name))
    return found


def _skip_unless_possible() -> None:
    """Skip, saying why, where this machine cannot run a Gluster volume at all."""
    if os.geteuid() != 0:
        pytest.skip("GlusterFS tests need root (glusterd, mount -t glusterfs)")
    missing = [c for c in ("glusterd", "gluster", "mount.glusterfs") if not shutil.which(c)]
    if missing:
        pytest.skip(
            f"GlusterFS not installed ({', '.join(missing)} missing): "
            "apt-get install glusterfs-server glusterfs-client, or run scripts/setup"
        )
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: this machine cannot mount FUSE filesystems")


def _volumes() -> list[str]:
    output = gluster_ok("volume", "list")
    return [] if "No volumes present" in output else output.split()


def _remove_stale_volumes() -> None:
    """Stop and delete test volumes of test runs that are gone (a killed run)."""
    for name in _volumes():
        owner = re.fullmatch(rf"{re.escape(VOLUME_PREFIX)}(\d+)", name)
        if owner and not _alive(int(owner[1])):
            gluster("volume", "stop", name, "force")
            gluster("volume", "delete", name)


@contextlib.contextmanager
def _glusterd(log_file: Path) -> Iterator[None]:
    """A running glusterd: the one already running, or one started here (a
    child of the test run, in the foreground).

    At exit a glusterd that a test run started (GLUSTERD_MARKER says which)
    is ended once no volume is left: another test run at the same time may
    still use it, and then ends it itself.
    """
    process = None
    if not glusterd_answers():
        process = subprocess.Popen(
            ["glusterd", "--no-daemon", "-p", str(GLUSTERD_PIDFILE), "-l", str(log_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    try:
        # Another test run's glusterd, started at the same moment, may be the
        # one that answers (this one then exits: the port is taken).
        deadline = time.monotonic() + GLUSTERD_WAIT_SECONDS
        while not glusterd_answers():
            if time.monotonic() > deadline:
                log = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
                raise RuntimeError(f"glusterd did not start:\n{log}")
            time.sleep(0.1)
        if process is not None and process.poll() is None:
            GLUSTERD_MARKER.write_text(f"{process.pid}\n")
        yield
    finally:
        _end_glusterd_if_unused(process)
        if process is not None and process.poll() is None and not _marked(process.pid):
            process.kill()  # started, but never answered
            process.wait(timeout=10)


def _marked(pid: int) -> bool:
    try:
        return int(GLUSTERD_MARKER.read_text()) == pid
    except (OSError, ValueError):
        return False


def _end_glusterd_if_unused(ours: subprocess.Popen[bytes] | None) -> None:
    try:
        pid = int(GLUSTERD_MARKER.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        if _alive(pid) and _volumes():
            return  # another test run's volume
    if _alive(pid) and _started_by_tests(pid):
        os.kill(pid, signal.SIGTERM)
        if ours is not None and ours.pid == pid:
            try:
                ours.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ours.kill()
        elif not eventually(lambda: not _alive(pid), 10):
            os.kill(pid, signal.SIGKILL)
    GLUSTERD_MARKER.unlink(missing_ok=True)
    GLUSTERD_PIDFILE.unlink(missing_ok=True)


def _started_by_tests(pid: int) -> bool:
    """Whether ``pid`` is a glusterd as the tests start it (not a service's)."""
    try:
        arguments = (Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return arguments[0].endswith(b"glusterd") and b"--no-daemon" in arguments


def _create_volume(name: str, brick_root: Path) -> tuple[str, Path]:
    """Create ``name`` on the first host gluster takes; (host, brick)."""
    refusals = []
    for host in local_hosts():
        brick = brick_root / f"brick-{len(refusals)}"
        # force: no questions about the brick's filesystem (a tmpfs).
        result = gluster("volume", "create", name, f"{host}:{brick}", "force")
        if result.returncode == 0:
            return host, brick
        refusals.append(f"{host}: {(result.stdout + result.stderr).strip()}")
    raise RuntimeError(f"gluster refused every host for a brick: {refusals}")


@pytest.fixture(scope="session", name="gluster_volume")
def gluster_volume_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterVolume]:
    """One started volume for the whole run, its brick on a tmpfs of BRICK_MIB."""
    _skip_unless_possible()
    workdir = tmp_path_factory.mktemp("gluster")
    brick_fs = workdir / "brick-fs"
    brick_fs.mkdir()
    name = f"{VOLUME_PREFIX}{os.getpid()}"
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_glusterd(workdir / "glusterd.log"))
        _remove_stale_volumes()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={BRICK_MIB}m", "tmpfs", str(brick_fs)],
            check=True,
        )
        cleanup.callback(unmount_datadir, brick_fs)
        host, brick = _create_volume(name, brick_fs)
        cleanup.callback(gluster, "volume", "delete", name)
        for option, value in VOLUME_OPTIONS.items():
            gluster_ok("volume", "set", name, option, value)
        cleanup.callback(gluster, "volume", "stop", name, "force")
        gluster_ok("volume", "start", name)
        yield GlusterVolume(name, host, brick, workdir)


@dataclass
class GlusterClients:
    """Two client mounts of one volume, standing for two hosts, and this
    test's own directory in the volume."""

    volume: GlusterVolume
    mounts: tuple[Path, Path]
    test_dir: str
    logs: list[Path] = field(default_factory=list)

    def root(self, host: int) -> Path:
        """This test's directory, as ``host`` (0 or 1) sees it."""
        return self.mounts[host] / self.test_dir

    def datadir(self, host: int) -> Path:
        """The shared datadir of this test, as ``host`` sees it (not yet created)."""
        return self.root(host) / "datadir"

    def users(self) -> list[int]:
        """Processes (fusestore daemons) whose arguments name a path on a client mount."""
        prefixes = tuple(f"{mount}/" for mount in self.mounts)
        return _pids_with_argument(lambda argument: argument.startswith(prefixes))


_test_dirs = itertools.count(1)


@pytest.fixture(name="gluster_clients")
def gluster_clients_fixture(
    request: pytest.FixtureRequest, gluster_volume: GlusterVolume, tmp_path: Path
) -> Iterator[GlusterClients]:
    """Two client mounts of the volume and a fresh directory for this test.

    Request it before ``mount_pool``. At teardown: a daemon still using the
    mounts is ended (SIGTERM, then SIGKILL), the brick is restarted if a test
    froze or killed it, the test's directory is removed and both clients
    unmounted, whatever happened.
    """
    test_name = re.sub(r"[^\w.-]", "_", request.node.name)[:80]
    test_dir = f"{next(_test_dirs):03d}-{os.getpid()}-{test_name}"
    mounts = (tmp_path / "host1-gluster", tmp_path / "host2-gluster")
    clients = GlusterClients(gluster_volume, mounts, test_dir)
    try:
        for index, mount in enumerate(mounts, start=1):
            log = tmp_path / f"host{index}-gluster.log"
            clients.logs.append(log)
            gluster_volume.mount_client(mount, log)
        clients.root(0).mkdir()
        yield clients
    finally:
        _end_users(clients)
        try:
            if not gluster_volume.brick_answers():
                gluster_volume.restart_brick()
            if is_mounted(mounts[0]) and eventually(lambda: _answers(mounts[0]), 15):
                _remove_tree(clients.root(0), mounts[0])
        finally:
            for mount in mounts:
                unmount_datadir(mount)


def _end_users(clients: GlusterClients) -> None:
    for pid in clients.users():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in clients.users():
        if not eventually(lambda pid=pid: not _alive(pid), 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _answers(mount: Path) -> bool:
    """Whether a client mount answers (it reconnects a few seconds after its brick is back)."""
    try:
        os.statvfs(mount)
    except OSError:
        return False
    return True


def _remove_tree(path: Path, mount: Path) -> None:
    """rm -rf in a child with a time limit: a client whose brick hangs must
    not hang the teardown."""
    if path.is_relative_to(mount) and path != mount:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=60, check=False)
