"""The request loop: busy polling must not starve signals, status or other mounts' work."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Datadir, MountFactory, TmpfsFactory, is_mounted, run_fusestore


@contextlib.contextmanager
def requests_streaming(path: Path) -> Iterator[list[int]]:
    """Keep the daemon busy with back-to-back requests meanwhile.

    Writes, because the kernel answers stat and reads from its caches.
    """
    done = threading.Event()
    answered = [0]
    fd = os.open(path, os.O_WRONLY)

    def hammer() -> None:
        try:
            while not done.is_set():
                os.pwrite(fd, b"x", 0)
                answered[0] += 1
        except OSError:
            pass  # unmounted under us: the test is over
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once unmounted
                os.close(fd)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        done.set()
        thread.join(timeout=10)


@pytest.mark.parametrize("busy_poll", ["0", "50"])
def test_status_and_signals_are_served_while_requests_stream(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, busy_poll: str
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--busy-poll", busy_poll)
    mounted.path("busy").write_bytes(b"x")
    with requests_streaming(mounted.path("busy")) as answered:
        result = run_fusestore("status", "--json", str(mounted.mountpoint), timeout=10)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["totals"]["files"] == 1
        assert answered[0] > 0
        mounted.process.send_signal(signal.SIGTERM)
        assert mounted.process.wait(timeout=10) == 0
    assert not is_mounted(mounted.mountpoint)
    assert f"busy_poll {busy_poll} µs" in mounted.log()


def test_busy_poll_must_be_a_whole_number(tmp_path: Path, mountpoint: Path) -> None:
    datadir = str(tmp_path / "d")
    for args in (["-o", "busy_poll=soon"], ["--busy-poll", "-5"]):
        result = run_fusestore("mount", "--datadir", datadir, *args, str(mountpoint))
        assert result.returncode == 2
        assert "whole number" in result.stderr
        assert ("'soon'" in result.stderr) or ("'-5'" in result.stderr)
    assert not is_mounted(mountpoint)
