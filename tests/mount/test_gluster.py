"""One pool on several hosts, on a real distributed filesystem: README
*One pool on several hosts*, and *Two daemons, one pool*, *Never replaces*,
*Spill-over* there.

Two fusestore daemons stand for two hosts: each has its own client mount of
one GlusterFS volume (tests/gluster.py) as its top datadir, the same
directory for both, and a tmpfs of its own below it, as a host's local disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    eventually,
    incoming_files,
    kept_files,
    run_fusestore,
    wait_for_exit,
)
from tests.gluster import (
    PING_TIMEOUT,
    GlusterClients,
    gluster_clients_fixture,  # noqa: F401 (the gluster_clients fixture)
    gluster_volume_fixture,  # noqa: F401 (the gluster_volume fixture)
)

SHARED_PRIORITY, LOCAL_PRIORITY = 200, 100
# README *No state but the datadirs*: a change shows within 1 s; with the
# volume's caches off (tests/gluster.py), another host's change does too.
# Half a second to spare for scheduling, as in test_namespace.py.
VISIBLE_WITHIN = 1.5

# GlusterFS as a datadir: how requests reach the daemon is not what is tested.
pytestmark = pytest.mark.one_transport


def two_hosts(
    gluster: GlusterClients,
    tmpfs: TmpfsFactory,
    mount_pool: MountFactory,
    *extra_args: str,
    local_mib: int = 16,
) -> tuple[MountedPool, MountedPool]:
    """A daemon per host: the shared Gluster datadir first, then the host's own tmpfs."""
    pools = []
    for host in (0, 1):
        local = Datadir(tmpfs(f"host{host + 1}-local", local_mib), LOCAL_PRIORITY)
        shared = Datadir(gluster.datadir(host), SHARED_PRIORITY)
        pools.append(mount_pool([shared, local], *extra_args))
    return pools[0], pools[1]


def shared_of(pool: MountedPool) -> Datadir:
    return pool.datadirs[0]


def local_of(pool: MountedPool) -> Datadir:
    return pool.datadirs[1]


def seconds_until(condition: Callable[[], bool], limit: float = VISIBLE_WITHIN) -> float:
    """Seconds until ``condition()`` first held; fails if not within ``limit``."""
    since = time.monotonic()
    while not condition():
        if time.monotonic() - since > limit:
            raise AssertionError(f"not within {limit} s")
        time.sleep(0.01)
    return time.monotonic() - since


def exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


NAMES = 200


def content(side: str, index: int) -> bytes:
    """What creator ``side`` writes into name ``index``: its letter, a length of its own."""
    return side.encode() * ((4096 + index) if side == "A" else (8192 + 3 * index))


def create_all(pool: MountedPool, side: str, start: threading.Barrier) -> dict[str, str]:
    """Create every name: per name ``"won"``, or the step and errno of the
    first failure.

    O_EXCL: without it, an open of a name the other host has already
    published opens that file, and the write goes into it.
    """
    outcomes = {}
    start.wait()
    for index in range(NAMES):
        name = f"image-{index:03d}"
        try:
            fd = os.open(pool.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            outcomes[name] = f"open {errno.errorcode[exc.errno]}"
            continue
        failure = None
        try:
            os.write(fd, content(side, index))
        except OSError as exc:
            failure = f"write {errno.errorcode[exc.errno]}"
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or f"close {errno.errorcode[exc.errno]}"
        outcomes[name] = failure or "won"
    return outcomes


@pytest.mark.timeout(120)
def test_creators_racing_for_200_names_from_two_hosts_each_win_whole_names_or_get_eexist(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    one, two = two_hosts(gluster_clients, tmpfs, mount_pool)
    start = threading.Barrier(2)
    outcomes: dict[str, dict[str, str]] = {}

    def run(pool: MountedPool, side: str) -> None:
        outcomes[side] = create_all(pool, side, start)

    creators = [threading.Thread(target=run, args=(p, s)) for p, s in ((one, "A"), (two, "B"))]
    for creator in creators:
        creator.start()
    for creator in creators:
        creator.join(timeout=100)
    assert set(outcomes) == {"A", "B"}, "a creator did not finish"

    failures = {o for side in "AB" for o in outcomes[side].values() if o != "won"}
    assert failures <= {"open EEXIST", "close EEXIST"}, failures
    lost_at_close = {side: [] for side in "AB"}
    for index in range(NAMES):
        name = f"image-{index:03d}"
        winners = [side for side in "AB" if outcomes[side][name] == "won"]
        assert len(winners) == 1, (name, outcomes["A"][name], outcomes["B"][name])
        expected = content(winners[0], index)
        assert one.path(name).read_bytes() == expected, name
        assert two.path(name).read_bytes() == expected, name
        for side in "AB":
            if outcomes[side][name] == "close EEXIST":
                lost_at_close[side].append(content(side, index))

    # Every name is published once, on the shared datadir; each loser's data
    # is kept aside whole, nothing is left being written.
    shared = shared_of(one)
    assert shared.names() == {f"image-{index:03d}" for index in range(NAMES)}
    assert local_of(one).names() == set() and local_of(two).names() == set()
    kept = sorted(path.read_bytes() for path in kept_files(shared))
    assert kept == sorted(lost_at_close["A"] + lost_at_close["B"])
    assert incoming_files(shared) == []


@pytest.mark.timeout(60)
def test_creates_renames_and_unlinks_on_one_host_show_on_the_other_within_a_second(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    one, two = two_hosts(gluster_clients, tmpfs, mount_pool)
    one.path("a").write_bytes(b"FIRST")
    one.path("b").write_bytes(b"second")
    assert two.path("a").read_bytes() == b"FIRST"  # now in two's caches
    assert exists(two.path("b"))

    # Rewritten in place, same size: only the time stamps tell the other host.
    fd = os.open(one.path("a"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"first", 0)
    finally:
        os.close(fd)
    seconds_until(lambda: two.path("a").read_bytes() == b"first")
    assert errno_of(os.stat, two.path("renamed")) == errno.ENOENT  # now in two's caches

    os.rename(one.path("a"), one.path("renamed"))
    seconds_until(lambda: exists(two.path("renamed")))
    seconds_until(lambda: not exists(two.path("a")))
    assert two.path("renamed").read_bytes() == b"first"

    os.unlink(two.path("b"))
    seconds_until(lambda: not exists(one.path("b")))
    assert sorted(os.listdir(one.mountpoint)) == sorted(os.listdir(two.mountpoint)) == ["renamed"]
    assert shared_of(one).names() == {"renamed"}

    # A file open on one host survives its unlink by the other (read for the
    # first time after the unlink: no cache on host one has its bytes).
    two.path("open").write_bytes(b"still there")
    reader = os.open(one.path("open"), os.O_RDONLY)
    try:
        os.unlink(two.path("open"))
        seconds_until(lambda: not exists(one.path("open")))
        assert os.pread(reader, 100, 0) == b"still there"
    finally:
        os.close(reader)


@pytest.mark.timeout(60)
def test_each_daemon_sweeps_only_leftovers_of_daemons_that_are_gone(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    one = mount_pool([Datadir(gluster_clients.datadir(0), SHARED_PRIORITY)])
    writing = os.open(one.path("in-progress"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(writing, b"not yet closed")
    two = mount_pool([Datadir(gluster_clients.datadir(1), SHARED_PRIORITY)])  # sweeps at start
    os.write(writing, b", now closed")
    os.close(writing)
    assert two.path("in-progress").read_bytes() == b"not yet closed, now closed"

    crashing = os.open(one.path("cut-short"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(crashing, b"never closed")
    leftovers = incoming_files(shared_of(one))
    assert len(leftovers) == 1
    one.process.send_signal(signal.SIGKILL)
    assert wait_for_exit(one.process.pid)
    with contextlib.suppress(OSError):  # the daemon is gone: ENOTCONN
        os.close(crashing)
    assert leftovers[0].exists()  # the running daemon does not sweep at once
    three = mount_pool([Datadir(gluster_clients.datadir(1), SHARED_PRIORITY)])
    assert not leftovers[0].exists()
    assert "removed leftover of an unfinished write" in three.log()
    assert errno_of(os.stat, three.path("cut-short")) == errno.ENOENT
    assert three.path("in-progress").read_bytes() == b"not yet closed, now closed"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_uncached(path: Path) -> bytes:
    """The file's bytes from its daemon, not from the page cache of an earlier read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@pytest.mark.timeout(90)
def test_a_write_spills_from_the_full_shared_datadir_while_the_other_host_reads(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    one, two = two_hosts(gluster_clients, tmpfs, mount_pool, local_mib=64)
    reference = os.urandom(8 * MiB)
    one.path("reference").write_bytes(reference)
    assert one.holders("reference") == [shared_of(one).path]

    # Fill the volume but 6 MiB, outside the datadir: a 24 MiB write meets ENOSPC there.
    vfs = os.statvfs(gluster_clients.root(0))
    with (gluster_clients.root(0) / "filler").open("wb") as filler:
        for _ in range(vfs.f_bavail * vfs.f_frsize // MiB - 6):
            filler.write(b"\0" * MiB)
    image = os.urandom(24 * MiB)

    reads: list[str] = []
    writing = threading.Event()

    def read_while_writing() -> None:
        while not reads or writing.is_set():
            reads.append(sha256(read_uncached(two.path("reference"))))

    writing.set()
    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        with one.path("image").open("wb") as f:
            for offset in range(0, len(image), MiB):
                f.write(image[offset : offset + MiB])
    finally:
        writing.clear()
        reader.join(timeout=60)

    assert one.holders("image") == [local_of(one).path]  # spilled to host one's own disk
    assert (local_of(one).path / "image").read_bytes() == image
    assert one.path("image").read_bytes() == image
    assert "moved 'image'" in one.log()
    assert incoming_files(shared_of(one)) == [] and kept_files(shared_of(one)) == []
    assert set(reads) == {sha256(reference)}
    # A host's own datadir is its own: the other host does not see the file.
    assert errno_of(os.stat, two.path("image")) == errno.ENOENT


def status_of(pool: MountedPool, limit: float) -> dict:
    """``fusestore status --json`` of the pool; fails if it takes over ``limit`` seconds."""
    started = time.monotonic()
    result = run_fusestore("status", "--json", str(pool.mountpoint), timeout=limit + 30)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < limit, f"status took {took:.1f} s"
    return json.loads(result.stdout)


def row_of(status: dict, datadir: Datadir) -> dict:
    (row,) = [row for row in status["datadirs"] if row["path"] == str(datadir.path)]
    return row


def shared_state(pool: MountedPool, limit: float) -> str:
    """The state ``fusestore status`` gives the pool's shared datadir."""
    return str(row_of(status_of(pool, limit), shared_of(pool))["state"])


def as_epoch(value: object) -> float:
    """A time in status: seconds since the epoch, or ISO 8601."""
    if isinstance(value, int | float):
        return float(value)
    assert isinstance(value, str), value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


DATADIR_TIMEOUT = 2
# fusestore status, a Python program's start included, once the datadir is known hung.
STATUS_SECONDS = 1.5
# Each stat or read of a local file while the shared datadir hangs: "about a second".
LOCAL_ANSWER_SECONDS = 1.0


@pytest.mark.timeout(90)
def test_a_brick_that_stops_answering_leaves_each_host_its_local_files(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    pools = two_hosts(gluster_clients, tmpfs, mount_pool, "--datadir-timeout", str(DATADIR_TIMEOUT))
    for host, pool in enumerate(pools, start=1):
        (local_of(pool).path / f"local-{host}").write_bytes(f"host {host}'s own".encode())
        pool.path(f"shared-{host}").write_bytes(f"written by host {host}".encode())
        assert pool.holders(f"shared-{host}") == [shared_of(pool).path]
    pids = [pool.process.pid for pool in pools]
    time.sleep(1.1)  # past the kernel's 1 s caches: what follows asks the daemons

    frozen_at, frozen_at_wall = time.monotonic(), time.time()
    gluster_clients.volume.freeze_brick()
    # Requests that need the shared datadir, left waiting in each daemon.
    waiting = {}

    def ask(pool: MountedPool, name: str) -> None:
        try:
            waiting[pool.path(name)] = pool.path(name).read_bytes()
        except OSError as exc:
            waiting[pool.path(name)] = errno.errorcode[exc.errno]

    askers = [
        threading.Thread(target=ask, args=(pool, f"shared-{host}"), daemon=True)
        for host, pool in enumerate(pools, start=1)
    ]
    for asker in askers:
        asker.start()

    try:
        # Each daemon finds its shared datadir hung and says so, since when;
        # status answers meanwhile (at first after up to datadir_timeout).
        for pool in pools:
            assert eventually(
                lambda pool=pool: shared_state(pool, DATADIR_TIMEOUT + 2) == "hung",
                DATADIR_TIMEOUT + 3,
            ), status_of(pool, DATADIR_TIMEOUT + 2)
        for pool in pools:
            status = status_of(pool, STATUS_SECONDS)
            row = row_of(status, shared_of(pool))
            assert row["state"] == "hung", row
            assert frozen_at_wall - 1 <= as_epoch(row["hung_since"]) <= time.time(), row
            assert row_of(status, local_of(pool))["state"] == "ok"

        # Meanwhile each host's own files answer at once: looked up for the
        # first time, then again once the kernel's 1 s caches have expired.
        for _ in range(2):
            for host, pool in enumerate(pools, start=1):
                local = pool.path(f"local-{host}")
                assert timed(lambda local=local: os.stat(local)) < LOCAL_ANSWER_SECONDS
                assert timed(local.read_bytes) < LOCAL_ANSWER_SECONDS
                assert local.read_bytes() == f"host {host}'s own".encode()
            time.sleep(1.1)
        checked = time.monotonic() - frozen_at
        assert checked < PING_TIMEOUT, (
            f"the checks took {checked:.1f} s: the clients stopped waiting for the "
            f"brick at {PING_TIMEOUT} s (network.ping-timeout), so they did not check a hang"
        )
    finally:
        gluster_clients.volume.restart_brick()

    # Back without a remount: old files, new files, the other host's files.
    for pool in pools:
        assert eventually(lambda pool=pool: shared_state(pool, 5) == "ok", PING_TIMEOUT + 5), (
            status_of(pool, 5)
        )
    for asker in askers:
        asker.join(timeout=PING_TIMEOUT + 5)
        assert not asker.is_alive(), "a request on the hung datadir never ended"
    # README *Hung datadirs*: a request waiting in the datadir when it hung gets EIO.
    assert set(waiting.values()) == {"EIO"}, waiting
    for host, pool in enumerate(pools, start=1):
        other = 3 - host
        assert pool.path(f"shared-{other}").read_bytes() == f"written by host {other}".encode()
        pool.path(f"after-{host}").write_bytes(b"after the hang")
        assert pool.holders(f"after-{host}") == [shared_of(pool).path]
    for host, pool in enumerate(pools, start=1):
        assert pool.path(f"after-{3 - host}").read_bytes() == b"after the hang"
        assert pool.process.poll() is None
    assert [pool.process.pid for pool in pools] == pids


@pytest.mark.timeout(60)
def test_a_killed_brick_fails_at_once_and_is_used_again_once_restarted(
    gluster_clients: GlusterClients, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    one, two = two_hosts(gluster_clients, tmpfs, mount_pool)
    one.path("shared").write_bytes(b"on the volume")
    (local_of(one).path / "local").write_bytes(b"on host one's disk")
    time.sleep(1.1)  # past the kernel's 1 s caches

    gluster_clients.volume.kill_brick()
    try:
        # The connection closed: the client fails at once, nothing hangs.
        assert errno_of(os.statvfs, shared_of(one).path) == errno.ENOTCONN
        assert errno_of(os.stat, one.path("shared")) in (errno.ENOENT, errno.EIO)
        assert timed(lambda: one.path("local").read_bytes()) < LOCAL_ANSWER_SECONDS
        assert one.path("local").read_bytes() == b"on host one's disk"
        state = shared_state(one, 2)
        assert state != "ok", state
        # New files go to the host's own disk meanwhile.
        one.path("during").write_bytes(b"while the brick was down")
        assert local_of(one).names() == {"local", "during"}
    finally:
        gluster_clients.volume.restart_brick()

    assert eventually(lambda: exists(two.path("shared")), PING_TIMEOUT)
    assert two.path("shared").read_bytes() == b"on the volume"
    assert eventually(lambda: shared_state(one, 5) == "ok", 10)
    one.path("after").write_bytes(b"after")
    assert one.holders("after") == [shared_of(one).path]
    assert one.holders("during") == [local_of(one).path]
    assert one.path("during").read_bytes() == b"while the brick was down"
    assert two.path("after").read_bytes() == b"after"
