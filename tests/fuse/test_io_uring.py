"""FUSE over io_uring: each CPU's requests answered on that CPU, /dev/fuse as fallback.

The rest of the suite runs once with the default (io_uring where the kernel
has it) and once with ``--no-io-uring`` (``scripts/test`` sets
FUSESTORE_TEST_TRANSPORT=devfuse), so every behaviour is checked through both.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusestore.fuse import uring
from tests.conftest import TRANSPORT, Datadir, MountFactory, TmpfsFactory, run_fusestore


def _switch_writable() -> bool:
    return uring.ENABLE_PARAMETER.exists() and os.access(uring.ENABLE_PARAMETER, os.W_OK)


def _io_uring_usable() -> bool:
    """The kernel has it, io_uring is allowed, and it is on or fusestore can switch it on."""
    if not uring.ENABLE_PARAMETER.exists():
        return False
    disabled = Path("/proc/sys/kernel/io_uring_disabled")  # sysctl, Linux 6.6+
    if disabled.exists() and disabled.read_text().strip() != "0":
        return False
    return uring.ENABLE_PARAMETER.read_text().strip() == "Y" or _switch_writable()


needs_io_uring = pytest.mark.skipif(
    not _io_uring_usable() or TRANSPORT == "devfuse",
    reason="no FUSE over io_uring here (kernel, or its switch), or this is the /dev/fuse run",
)


@pytest.fixture
def on_each_cpu() -> Iterator[list[int]]:
    """The CPUs this test may run on; the test's thread is pinned back afterwards."""
    allowed = os.sched_getaffinity(0)
    yield sorted(allowed)
    os.sched_setaffinity(0, allowed)


def status_of(mountpoint: Path) -> dict:
    result = run_fusestore("status", "--json", str(mountpoint), timeout=10)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
@pytest.mark.skipif(not _switch_writable(), reason="the kernel's switch cannot be written here")
def test_the_kernel_switch_is_turned_on_when_off(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    uring.ENABLE_PARAMETER.write_text("0")
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    assert uring.ENABLE_PARAMETER.read_text().strip() == "Y"
    assert "switched on FUSE over io_uring" in mounted.log()
    mounted.path("image").write_bytes(b"through the queues")
    assert mounted.path("image").read_bytes() == b"through the queues"
    assert status_of(mounted.mountpoint)["io_uring_queues"] > 0


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
def test_forgets_still_reach_the_daemon_in_batches(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--debug")
    for index in range(20):
        mounted.path(f"short-lived-{index}").write_bytes(b"x")
        os.unlink(mounted.path(f"short-lived-{index}"))
    forgets: list[str] = []
    for _ in range(50):  # they come in batches, at most every 20 ms
        forgets = re.findall(r"forget\(inode=\d+, \d+ bytes\) #\d+ via (.+)", mounted.log())
        if forgets:
            break
        time.sleep(0.05)
    assert forgets, "no forget reached the daemon"
    assert set(forgets) == {"/dev/fuse"}
