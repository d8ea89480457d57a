"""systemd: README "Running it as a service", *systemd* (units, Type=notify)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import (
    REPO,
    Datadir,
    fusestore_command,
    is_mounted,
    mount_fields,
    write_config,
)


def test_shipped_units_pass_systemd_analyze_verify() -> None:
    units = [REPO / "systemd" / "fusestore@.service", REPO / "systemd" / "var-lib-images.mount"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    mount_unit = (REPO / "systemd" / "var-lib-images.mount").read_text()
    escaped = subprocess.run(
        ["systemd-escape", "-p", "--suffix=mount", "/var/lib/images"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert escaped == "var-lib-images.mount"
    assert "Type=fuse.fusestore" in mount_unit and "Where=/var/lib/images" in mount_unit


def fill_queue(path: Path) -> tuple[socket.socket, int]:
    """Fill the receive queue of the datagram socket at ``path`` from a socket
    of our own, so that the next sender waits for room: (our socket, count)."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    count = 0
    while True:
        try:
            filler.sendto(b"FILLER=1", str(path))
        except BlockingIOError:
            return filler, count
        count += 1


def datagram_waiting_in(pid: int) -> bytes | None:
    """What a thread of ``pid`` that waits for room in a full datagram socket
    (``sendto``, blocked in the kernel's ``unix_wait_for_peer``) is sending."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() != "unix_wait_for_peer":
                continue
            # number, then the arguments: sendto(fd, buffer, length, ...)
            _, _, buffer, length, *_ = (task / "syscall").read_text().split()
            with open(f"/proc/{pid}/mem", "rb") as memory:
                memory.seek(int(buffer, 16))
                return memory.read(int(length, 16))
        except (OSError, ValueError):
            continue  # the thread moved on meanwhile
    return None


def test_notify_ready_is_sent_only_once_the_mount_answers(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    """systemd hears READY=1 once the mountpoint answers (README, *systemd*).

    The notify socket's queue is full when the daemon starts, so its READY=1
    waits in sendto until the test makes room: at that moment, READY being
    sent and not yet heard, the mountpoint must already be a fusestore mount
    that answers a stat and a statfs.
    """
    config = write_config(tmp_path / "pool.toml", datadirs=[two_datadirs[0].spec])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    listener.bind(str(notify_path))
    listener.settimeout(15)
    filler, queued = fill_queue(notify_path)
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        fusestore_command("mount", "--foreground", "--config", str(config), str(mountpoint)),
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 15
        while (waiting := datagram_waiting_in(daemon.pid)) is None:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon never sent READY=1"
            time.sleep(0.01)
        assert waiting == f"READY=1\nSTATUS=serving {mountpoint}".encode()
        # READY=1 is being sent, not heard yet: the mount is there and answers.
        fields = mount_fields(mountpoint)
        assert fields is not None and fields[2] == "fuse.fusestore"
        answers = subprocess.run(
            ["stat", "--format=%i", str(mountpoint)], capture_output=True, text=True, timeout=10
        )
        assert answers.stdout.strip() == "1", answers.stderr  # the pool's root inode
        answers = subprocess.run(
            ["stat", "--file-system", "--format=%t", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert answers.stdout.strip() == "65735546", answers.stderr  # FUSE_SUPER_MAGIC
        # Make room: the fillers come out, then READY=1, and nothing else.
        assert [listener.recv(4096) for _ in range(queued)] == [b"FILLER=1"] * queued
        assert listener.recv(4096).decode() == f"READY=1\nSTATUS=serving {mountpoint}"
        daemon.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in listener.recv(4096).decode()
        assert "READY=1" in listener.recv(4096).decode()
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert daemon.wait(timeout=20) == 0
        assert not is_mounted(mountpoint)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        filler.close()
        listener.close()
        log.close()


def test_notify_stopping_when_unmounted_from_outside(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    """`umount` (not a signal) ends the daemon: systemd still hears STOPPING=1."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    listener.bind(str(notify_path))
    listener.settimeout(15)
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        fusestore_command(
            "mount", "--foreground", "--datadirs", two_datadirs[0].spec, str(mountpoint)
        ),
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        stdout=log,
        stderr=log,
    )
    try:
        assert listener.recv(4096).decode().startswith("READY=1")
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        listener.close()
        log.close()
