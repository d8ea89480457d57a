"""What the daemon logs, and where: README "Running it as a service", *Logs*
(docs/operations.md): a line per event that matters, on stderr in the
foreground, in ``--log-file``, and to syslog for a background daemon without
a log file.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MountFactory,
    TmpfsFactory,
    daemon_pid,
    run_fusestore,
    wait_for_exit,
)

SYSLOG_SOCKET = Path("/dev/log")


def test_a_foreground_daemon_logs_mounted_ready_and_unmounted_in_order(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    high, low = Datadir(tmpfs("high", 16), 2), Datadir(tmpfs("low", 16), 1)
    mounted = mount_pool([high, low], "--min-free-space", "1M")
    assert mounted.unmount() == 0
    lines = mounted.log().splitlines()
    mounted_at = next(i for i, line in enumerate(lines) if " INFO mounted " in line)
    assert (
        f"mounted {mounted.mountpoint} with datadirs {high.path} (priority 2, ok), "
        f"{low.path} (priority 1, ok), min_free_space 1048576 bytes"
    ) in lines[mounted_at]
    ready_at = next(
        i for i, line in enumerate(lines) if f"ready: {mounted.mountpoint} answers" in line
    )
    unmounted_at = next(
        i for i, line in enumerate(lines) if f"unmounted {mounted.mountpoint}" in line
    )
    assert mounted_at < ready_at < unmounted_at


@pytest.fixture
def syslog() -> Iterator[socket.socket]:
    """A syslog socket of our own at /dev/log (none is there on the test machines)."""
    if SYSLOG_SOCKET.exists():
        pytest.skip("this machine has its own /dev/log; the test would need to take it over")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(SYSLOG_SOCKET))
    server.settimeout(10)
    try:
        yield server
    finally:
        server.close()
        SYSLOG_SOCKET.unlink(missing_ok=True)


def received(server: socket.socket, until: str, seconds: float = 10) -> list[str]:
    """Messages that reached the syslog socket, up to one containing ``until``."""
    messages: list[str] = []
    deadline = time.monotonic() + seconds
    while not any(until in message for message in messages):
        server.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(server.recv(65536).decode(errors="replace"))
        except TimeoutError:
            raise AssertionError(f"{until!r} never reached syslog: {messages}") from None
    return messages


def test_a_background_daemon_without_a_log_file_logs_to_syslog(
    mountpoint: Path, tmpfs: TmpfsFactory, syslog: socket.socket
) -> None:
    datadir = Datadir(tmpfs("d", 16), 0)
    result = run_fusestore("mount", "--datadirs", datadir.spec, str(mountpoint))
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mountpoint)
    messages = received(syslog, f"ready: {mountpoint} answers")
    assert any(f"fusestore[{pid}]: INFO mounted {mountpoint}" in m for m in messages)
    subprocess.run(["umount", str(mountpoint)], check=True)
    received(syslog, f"unmounted {mountpoint}")
    assert wait_for_exit(pid)


def test_a_daemon_that_would_lose_its_log_says_so_before_it_goes(
    mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    if SYSLOG_SOCKET.exists():
        pytest.skip("this machine has a syslog socket: the log is not lost")
    datadir = Datadir(tmpfs("d", 16), 0)
    result = run_fusestore("mount", "--datadirs", datadir.spec, str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert "no --log-file and no syslog (/dev/log)" in result.stderr
    subprocess.run(["umount", str(mountpoint)], check=True)
