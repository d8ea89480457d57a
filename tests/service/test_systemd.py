"""systemd: README "Running it as a service", *systemd* (units, Type=notify)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.conftest import (
    REPO,
    Datadir,
    fusestore_command,
    is_mounted,
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


def test_notify_ready_only_once_the_mount_answers(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(tmp_path / "pool.toml", datadirs=[two_datadirs[0].spec])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    listener.bind(str(notify_path))
    listener.settimeout(15)
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        fusestore_command("mount", "--foreground", "--config", str(config), str(mountpoint)),
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        stdout=log,
        stderr=log,
    )
    try:
        message = listener.recv(4096).decode()
        mounted_at_ready = is_mounted(mountpoint)
        assert "READY=1" in message
        assert mounted_at_ready
        assert os.stat(mountpoint).st_dev != os.stat(mountpoint.parent).st_dev
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
        listener.close()
        log.close()
