"""Ending the daemon: umount from outside, or a signal to the daemon.

README: "``fusermount3 -u``/``umount`` ends the daemon with 0; so do SIGTERM
and SIGINT, which unmount first."
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MountFactory,
    TmpfsFactory,
    daemon_pid,
    fusestore_command,
    incoming_files,
    is_mounted,
    wait_for_log,
)

# What I/O through a descriptor of a mount whose daemon has gone gets:
# ENOTCONN once the connection is down; ECONNABORTED for a request that
# meets FUSE over io_uring's queues while the kernel still tears them down.
CONNECTION_GONE = (errno.ENOTCONN, errno.ECONNABORTED)

# Runs a command that leaves a daemon in the background, and reports that
# daemon's exit status: as a child subreaper it, not init, inherits the
# daemon when the command that forked it exits.
REAPER = """
import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl: {os.strerror(ctypes.get_errno())}")
started = subprocess.run(sys.argv[1:], check=False)
print("command", started.returncode, flush=True)
if started.returncode == 0:
    pid, status = os.wait()
    print("daemon", pid, os.waitstatus_to_exitcode(status), flush=True)
"""


def test_fusermount_unmount_ends_daemon_with_status_zero(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    mounted.path("kept").write_bytes(b"still here")
    assert mounted.unmount() == 0
    assert not is_mounted(mounted.mountpoint)
    assert (mounted.datadirs[0].path / "kept").read_bytes() == b"still here"
    assert f"unmounted {mounted.mountpoint}" in mounted.log()


def test_umount_ends_a_foreground_daemon_with_status_zero(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    mounted.path("kept").write_bytes(b"still here")
    subprocess.run(["umount", str(mounted.mountpoint)], check=True)
    assert mounted.process.wait(timeout=20) == 0
    assert not is_mounted(mounted.mountpoint)
    assert (mounted.datadirs[0].path / "kept").read_bytes() == b"still here"
    assert f"unmounted {mounted.mountpoint}" in mounted.log()


def test_umount_ends_a_background_daemon_with_status_zero(
    tmp_path: Path, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    datadir = Datadir(tmpfs("d", 8), 0)
    log = tmp_path / "daemon.log"
    command = fusestore_command(
        "mount", "--datadirs", datadir.spec, "--log-file", str(log), str(mountpoint)
    )
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, *command], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reaper.stdout is not None
        assert reaper.stdout.readline() == "command 0\n"  # returned once the mount answered
        assert is_mounted(mountpoint)
        pid = daemon_pid(mountpoint)
        (mountpoint / "kept").write_bytes(b"still here")
        subprocess.run(["umount", str(mountpoint)], check=True)
        out, _ = reaper.communicate(timeout=20)
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait(timeout=10)
    assert out == f"daemon {pid} 0\n"
    assert not is_mounted(mountpoint)
    assert (datadir.path / "kept").read_bytes() == b"still here"
    assert f"unmounted {mountpoint}" in log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_files_open_unmounts_exits_zero_and_cuts_the_open_descriptors_off(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, signum: signal.Signals
) -> None:
    """Files open at the signal do not hold the daemon: it unmounts and exits
    0 at once. What was written to an existing file is in its datadir; a new
    file still open was never published (it has no name: README, *Crash-safe
    publication*), and the next mount removes it and says so. The
    descriptors stay, cut off from the pool."""
    datadir = Datadir(tmpfs("d", 8), 0)
    mounted = mount_pool([datadir])
    mounted.path("existing").write_bytes(b"0123456789")
    existing = os.open(mounted.path("existing"), os.O_RDWR)
    new = os.open(mounted.path("open-at-signal"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        assert os.pwrite(existing, b"written", 0) == 7
        assert os.write(new, b"written before the signal") == 25
        mounted.process.send_signal(signum)
        assert mounted.process.wait(timeout=20) == 0
        assert not is_mounted(mounted.mountpoint)
        for fd in (existing, new):
            with pytest.raises(OSError) as caught:
                os.pwrite(fd, b"after the signal", 0)
            assert caught.value.errno in CONNECTION_GONE, caught.value
    finally:
        for fd in (existing, new):
            with pytest.raises(OSError) as caught:
                os.close(fd)  # FLUSH can reach no daemon
            assert caught.value.errno in CONNECTION_GONE, caught.value
    log = mounted.log()
    assert f"received {signum.name}: unmounting" in log
    assert f"unmounted {mounted.mountpoint}" in log
    assert (datadir.path / "existing").read_bytes() == b"written789"
    assert datadir.names() == {"existing"}
    (leftover,) = incoming_files(datadir)
    assert leftover.read_bytes() == b"written before the signal"
    remounted = mount_pool([datadir])
    assert f"removed leftover of an unfinished write: {leftover} (25 bytes)" in remounted.log()
    assert incoming_files(datadir) == []
    assert sorted(os.listdir(remounted.mountpoint)) == ["existing"]


def test_debug_logs_every_request(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--debug")
    mounted.path("traced").write_bytes(b"x")
    os.listdir(mounted.mountpoint)
    # RELEASE and RELEASEDIR come after close() has returned: wait for them.
    for operation in ("create", "write", "flush", "release", "opendir", "readdir", "releasedir"):
        wait_for_log(mounted.log_path, f"DEBUG {operation}(inode=")
