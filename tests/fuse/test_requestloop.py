"""The request loop: busy polling must not starve signals, status or other mounts' work."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Datadir, MountFactory, TmpfsFactory, is_mounted, run_fusestore

# What a write through a descriptor of a mount whose daemon has gone gets:
# ENOTCONN once the connection is down; ECONNABORTED for a request in flight
# when it went, or one that meets FUSE over io_uring's queues being torn down.
CONNECTION_GONE = (errno.ENOTCONN, errno.ECONNABORTED)


@dataclass
class Stream:
    """Back-to-back writes from one thread, counted."""

    answered: int = 0
    failure: OSError | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def count(self) -> None:
        with self._progress:
            self.answered += 1
            self._progress.notify_all()

    def wait_past(self, answered: int, seconds: float = 10) -> bool:
        """Wait until more than ``answered`` writes were answered (False: stalled or ended)."""
        with self._progress:
            return self._progress.wait_for(
                lambda: self.answered > answered or self.ended.is_set(), timeout=seconds
            ) and (self.answered > answered)


@contextlib.contextmanager
def requests_streaming(path: Path) -> Iterator[Stream]:
    """Keep the daemon busy with back-to-back requests meanwhile.

    Writes, because the kernel answers stat and reads from its caches. The
    stream runs until the test ends or a write fails (``failure``), such as
    once the mount is gone.
    """
    done = threading.Event()
    stream = Stream()
    fd = os.open(path, os.O_WRONLY)

    def hammer() -> None:
        try:
            while not done.is_set():
                os.pwrite(fd, b"x", 0)
                stream.count()
        except OSError as exc:
            stream.failure = exc
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once unmounted
                os.close(fd)
            stream.ended.set()
            with stream._progress:
                stream._progress.notify_all()

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        yield stream
    finally:
        done.set()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "busy_poll", ["0", "50"], ids=["no-busy-poll", "busy-poll-50us-on-dev-fuse"]
)
def test_status_and_sigterm_are_served_while_writes_stream(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, busy_poll: str
) -> None:
    # Busy polling is a /dev/fuse thing: with io_uring queues the loop does not spin.
    transport = ["--no-io-uring"] if busy_poll != "0" else []
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--busy-poll", busy_poll, *transport)
    mounted.path("busy").write_bytes(b"x")
    with requests_streaming(mounted.path("busy")) as stream:
        # The stream is running before status is asked, and still after it answered.
        assert stream.wait_past(100), stream.failure
        result = run_fusestore("status", "--json", str(mounted.mountpoint), timeout=10)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["totals"]["files"] == 1
        assert stream.wait_past(stream.answered + 100), stream.failure
        # Likewise SIGTERM: sent while writes stream, it ends the daemon ...
        mounted.process.send_signal(signal.SIGTERM)
        assert mounted.process.wait(timeout=10) == 0
        # ... under the stream, whose next write finds the mount gone.
        assert stream.ended.wait(timeout=10)
    assert stream.failure is not None
    assert stream.failure.errno in CONNECTION_GONE, stream.failure
    assert not is_mounted(mounted.mountpoint)
    assert (mounted.datadirs[0].path / "busy").read_bytes() == b"x"
    log = mounted.log()
    assert f"busy_poll {busy_poll} µs" in log
    assert "received SIGTERM: unmounting" in log
    if transport:
        assert "requests through /dev/fuse" in log


def test_busy_poll_must_be_a_whole_number(tmp_path: Path, mountpoint: Path) -> None:
    datadir = tmp_path / "d"
    for args, value in ((["-o", "busy_poll=soon"], "'soon'"), (["--busy-poll", "-5"], "'-5'")):
        result = run_fusestore("mount", "--datadir", str(datadir), *args, str(mountpoint))
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()  # one line, naming the value
        assert "must be a whole number, not " + value in line, result.stderr
    assert not is_mounted(mountpoint)
    assert not datadir.exists()  # refused before anything was created
