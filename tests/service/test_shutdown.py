"""Ending the daemon: umount from outside, or a signal to the daemon."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import Datadir, MountFactory, TmpfsFactory, is_mounted


def test_fusermount_unmount_ends_daemon_with_status_zero(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    mounted.path("kept").write_bytes(b"still here")
    assert mounted.unmount() == 0
    assert not is_mounted(mounted.mountpoint)
    assert (mounted.datadirs[0].path / "kept").read_bytes() == b"still here"
    assert "unmounted" in mounted.log()


def test_umount_ends_daemon_with_status_zero(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    subprocess.run(["umount", str(mounted.mountpoint)], check=True)
    assert mounted.process.wait(timeout=20) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, signum: signal.Signals
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    fd = os.open(mounted.path("open-at-signal"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written before the signal")
    os.close(fd)
    mounted.process.send_signal(signum)
    assert mounted.process.wait(timeout=20) == 0
    assert not is_mounted(mounted.mountpoint)
    assert f"received {signum.name}" in mounted.log()
    assert (mounted.datadirs[0].path / "open-at-signal").read_bytes() == (
        b"written before the signal"
    )


def test_debug_logs_every_request(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--debug")
    mounted.path("traced").write_bytes(b"x")
    os.listdir(mounted.mountpoint)
    log = mounted.log()
    for operation in ("create(", "write(", "release(", "opendir(", "readdir("):
        assert operation in log
