"""FUSE over io_uring: each CPU's requests answered on that CPU, /dev/fuse as fallback.

The rest of the suite runs once with the default (io_uring where the kernel
has it) and once with ``--transport devfuse`` (``scripts/test`` sets
FUSESTORE_TEST_TRANSPORT=devfuse), so every behaviour is checked through both.
:func:`test_the_daemon_logs_the_transport_this_run_tests` checks which one the
daemon really used and adds it to the end of the run's summary. On a kernel
with FUSE over io_uring the default run skips nothing here: the tests turn
on what they need and put the kernel's switches back in a finaliser.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusestore.fuse import uring
from fusestore.fuse.dirents import OWN_INODES
from tests.conftest import (
    TRANSPORT,
    Datadir,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    eventually,
    run_fusestore,
    wait_for_log,
)

IO_URING_DISABLED = Path("/proc/sys/kernel/io_uring_disabled")  # sysctl, Linux 6.6+
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

_KERNEL_HAS_IT = pytest.mark.skipif(
    not uring.ENABLE_PARAMETER.exists(),
    reason=f"this kernel has no FUSE over io_uring (no {uring.ENABLE_PARAMETER})",
)
_NOT_THE_DEV_FUSE_RUN = pytest.mark.skipif(
    TRANSPORT == "devfuse",
    reason="the /dev/fuse run (FUSESTORE_TEST_TRANSPORT=devfuse) mounts with --transport devfuse",
)


def needs_io_uring(test: Callable[..., None]) -> Callable[..., None]:
    """Runs wherever the kernel has FUSE over io_uring, but in the /dev/fuse run;
    the kernel's switches are turned on for it and put back afterwards."""
    return pytest.mark.usefixtures("kernel_switches")(_NOT_THE_DEV_FUSE_RUN(_KERNEL_HAS_IT(test)))


@pytest.fixture
def kernel_switches(request: pytest.FixtureRequest) -> None:
    """FUSE over io_uring allowed; the fuse module's switch and the io_uring
    sysctl are put back as they were in a finaliser, whatever the test wrote."""
    switches = (uring.ENABLE_PARAMETER, IO_URING_DISABLED)
    saved = {path: path.read_text() for path in switches if path.exists()}

    def restore() -> None:
        for path, text in saved.items():
            if path.read_text() != text:
                path.write_text(text)

    request.addfinalizer(restore)
    if saved.get(IO_URING_DISABLED, "0").strip() != "0":
        IO_URING_DISABLED.write_text("0")


@pytest.fixture
def on_each_cpu() -> Iterator[list[int]]:
    """The CPUs this test may run on; the test's thread is pinned back afterwards."""
    allowed = os.sched_getaffinity(0)
    yield sorted(allowed)
    os.sched_setaffinity(0, allowed)


@pytest.fixture
def summary_line(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``summary_line(text)`` adds a line to the end of the run's terminal summary."""
    lines: list[str] = []

    class Summary:
        def pytest_terminal_summary(self, terminalreporter: object) -> None:
            for line in lines:
                terminalreporter.write_line(line)  # type: ignore[attr-defined]

    request.config.pluginmanager.register(Summary(), f"fusestore-summary {request.node.nodeid}")
    return lines.append


def status_of(mountpoint: Path) -> dict:
    result = run_fusestore("status", "--json", str(mountpoint), timeout=10)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def forgotten_inodes(log: str) -> int:
    """Inodes forgotten in the debug log: one per forget, the count of each batch_forget."""
    singles = len(re.findall(r"\] DEBUG forget\(inode=\d+, 8 bytes\)", log))
    batches = re.findall(r"batch_forget\(inode=0, (\d+) bytes\)", log)
    return singles + sum((int(size) - 8) // 16 for size in batches)


def test_the_daemon_logs_the_transport_this_run_tests(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, summary_line: Callable[[str], None]
) -> None:
    """Every mount of this run goes the way this one does (conftest's start_mount)."""
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    (transport,) = re.findall(r"; requests through (.+)$", mounted.log(), re.MULTILINE)
    queues = status_of(mounted.mountpoint)["io_uring_queues"]
    if TRANSPORT == "devfuse":
        assert (transport, queues) == ("/dev/fuse", 0)
    elif uring.ENABLE_PARAMETER.exists():
        # The default run on such a kernel must test io_uring, not /dev/fuse again.
        assert transport == "io_uring: requests answered on the CPU that made them"
        assert queues == len(uring.possible_cpus()), mounted.log()
    else:
        assert (transport, queues) == ("/dev/fuse (the kernel does not offer io_uring)", 0)
    summary_line(
        f"fusestore: this run (FUSESTORE_TEST_TRANSPORT={TRANSPORT}) tested requests through "
        f"{transport} ({queues} io_uring queues)"
    )


@needs_io_uring
def test_requests_are_answered_by_the_queue_of_the_cpu_that_made_them(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, on_each_cpu: list[int]
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--debug")
    assert status_of(mounted.mountpoint)["io_uring_queues"] == len(uring.possible_cpus())
    for cpu in on_each_cpu:
        os.sched_setaffinity(0, {cpu})
        name = f"probe-from-cpu-{cpu}-" + "x" * 20
        mounted.path(name).write_bytes(b"x")
        os.unlink(mounted.path(name))
        # The lookup of a new name carries the name and its NUL.
        lookups = re.findall(
            rf"lookup\(inode=1, {len(name) + 1} bytes\) #\d+ via (.+)", mounted.log()
        )
        assert lookups[-1] == f"io_uring queue {cpu}", lookups
    assert "requests through io_uring" in mounted.log()


@needs_io_uring
def test_the_kernel_switch_is_turned_on_when_off(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    uring.ENABLE_PARAMETER.write_text("0")  # put back by the kernel_switches finaliser
    assert uring.ENABLE_PARAMETER.read_text().strip() == "N"
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    assert uring.ENABLE_PARAMETER.read_text().strip() == "Y"
    assert "switched on FUSE over io_uring" in mounted.log()
    mounted.path("image").write_bytes(b"through the queues")
    assert mounted.path("image").read_bytes() == b"through the queues"
    assert status_of(mounted.mountpoint)["io_uring_queues"] == len(uring.possible_cpus())


def test_no_io_uring_keeps_every_request_on_dev_fuse(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    switch = uring.ENABLE_PARAMETER.read_text() if uring.ENABLE_PARAMETER.exists() else None
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--no-io-uring", "--debug")
    mounted.path("image").write_bytes(b"through /dev/fuse")
    assert mounted.path("image").read_bytes() == b"through /dev/fuse"
    assert status_of(mounted.mountpoint)["io_uring_queues"] == 0
    vias = set(re.findall(r"#\d+ via (.+)", mounted.log()))
    assert vias == {"/dev/fuse"}
    if switch is not None:
        assert uring.ENABLE_PARAMETER.read_text() == switch  # left as it was
    table = run_fusestore("status", str(mounted.mountpoint), timeout=10)
    assert "requests through /dev/fuse" in table.stdout


@needs_io_uring
def test_forgets_of_unlinked_files_reach_the_daemon_through_dev_fuse(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """The queues take every request but forgets (and interrupts): those still
    come through /dev/fuse, one for each of the 20 inodes."""
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--debug")
    for index in range(20):
        mounted.path(f"short-lived-{index}").write_bytes(b"x")
        os.unlink(mounted.path(f"short-lived-{index}"))
    # Bounded: the daemon lets forgets gather for 20 ms at most.
    assert eventually(lambda: forgotten_inodes(mounted.log()) >= 20), mounted.log()
    assert forgotten_inodes(mounted.log()) == 20, mounted.log()
    vias = re.findall(r"forget\(inode=\d+, \d+ bytes\) #\d+ via (.+)", mounted.log())
    assert set(vias) == {"/dev/fuse"}


def listed_inodes(mounted: MountedPool) -> dict[str, int]:
    return {entry.name: entry.inode() for entry in os.scandir(mounted.mountpoint)}


def test_forgets_that_pile_up_come_as_one_batch_forget_that_forgets_every_inode(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """The daemon is stopped while the kernel drops its 50 inodes, so their
    forgets are all queued when it reads the next one: the kernel sends them
    as one BATCH_FORGET (50 entries of 16 bytes after an 8-byte head), and
    the daemon must forget each inode (a listing then numbers the names
    itself, no longer with the kernel's inode numbers)."""
    datadir = Datadir(tmpfs("d", 8), 0)
    names = [f"looked-up-{index}" for index in range(50)]
    for name in names:
        (datadir.path / name).write_bytes(b"x")
    mounted = mount_pool([datadir], "--debug")
    looked_up = {name: os.stat(mounted.path(name)).st_ino for name in names}
    assert listed_inodes(mounted) == looked_up
    mounted.process.send_signal(signal.SIGSTOP)
    try:
        DROP_CACHES.write_text("2")  # free dentries and inodes: the kernel forgets them all
    finally:
        mounted.process.send_signal(signal.SIGCONT)
    wait_for_log(mounted.log_path, f"batch_forget(inode=0, {8 + 16 * len(names)} bytes)")
    assert re.findall(r"batch_forget\(inode=0, \d+ bytes\) #\d+ via (.+)", mounted.log()) == [
        "/dev/fuse"
    ]
    assert forgotten_inodes(mounted.log()) == len(names)
    # The log line comes as the request is taken, the forgetting just after.
    assert eventually(lambda: min(listed_inodes(mounted).values()) >= OWN_INODES), listed_inodes(
        mounted
    )
    assert sorted(listed_inodes(mounted)) == sorted(names)
