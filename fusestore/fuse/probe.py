"""Time small requests through one transport, on a throw-away mount.

Which transport answers small requests faster depends on the machine, not on
the code (``transport.py``, docs/design.md): so before the pool is mounted,
a *probe* filesystem — an empty root directory whose attributes may not be
cached, so that every ``stat`` of it reaches the daemon as a GETATTR,
answered with the pool's own root ``stat`` — is mounted on a temporary
directory and served by the very
:class:`~fusestore.fuse.requestloop.RequestLoop` the pool will use, with the
same ``busy_poll``. Another process, not a thread of ours (a client thread
would compete with the loop for the interpreter lock, which a real program
does not), stats its root :data:`STATS` times per round after a warm-up and
reports each round's rate; ``transport.py`` takes turns between the
transports and keeps the best round of each.

It runs in the daemon's own process: pyfuse3 mounts and unmounts as often
as asked (``init`` → ``close`` → ``init``), and the probe mount is gone, its
threads ended, before the pool is mounted. A probe mount is never left
behind: whatever fails, it is unmounted (lazily, if it must) and its
directory removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import pyfuse3

from fusestore.fuse import protocol as p
from fusestore.fuse.requestloop import RequestLoop, fuse_device_fd

if TYPE_CHECKING:
    from fusestore.fuse.handlers import Operations

log = logging.getLogger(__name__)

STATS = 2000  # per round: at 20,000/s a round takes 0.1 s
_CLIENT_TIMEOUT = 5.0  # seconds: a probe that takes this long is a failed one
_OPTIONS = ("fsname=fusestore-probe", "subtype=fusestore-probe")
_MNT_DETACH = 2

# The client: a warm-up (the first requests pay for faulting in and waking
# everything), then the timed rounds; prints each round's stats per second.
_CLIENT = """\
import os, sys, time
path, count, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stat, clock = os.stat, time.perf_counter
for _ in range(count // 4):
    stat(path)
for _ in range(rounds):
    start = clock()
    for _ in range(count):
        stat(path)
    print(count / (clock() - start))
"""


class ProbeError(RuntimeError):
    """The probe could not mount, serve or time its filesystem."""


class _Health:
    """The rescuer's view of the datadirs (``rescue.py``): the probe has none."""

    timeout = _CLIENT_TIMEOUT

    @staticmethod
    def any_hung() -> bool:
        return False


class _Pool:
    health = _Health()


class _RootOnly:
    """The operations of the probe filesystem: GETATTR of its root, nothing else.

    What the request loop needs of :class:`~fusestore.fuse.handlers.Operations`
    and nothing more. Each GETATTR calls ``root_stat`` (the daemon passes the
    pool's, so that the probe's request costs what a ``stat`` of the pool's
    root costs: a request that costs next to nothing favours ``/dev/fuse``
    unfairly, its round trip being shorter than the time a CPU waits before
    it halts). The attributes come with a timeout of 0: the kernel asks again
    at every ``stat``.
    """

    def __init__(self, root_stat: Callable[[], os.stat_result]) -> None:
        self.pool = _Pool()
        self.device: int | None = None
        self.passthrough = False
        self.outside_lock = contextlib.nullcontext
        self.root_stat = root_stat
        self.handlers = {p.GETATTR: self.getattr}

    def getattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        st = self.root_stat()
        return p.ATTR_OUT_HEAD.pack(0, 0, 0) + p.attr_of(1, st)  # the root: a datadir's


def stats_per_second(
    io_uring: bool, busy_poll_us: int, root_stat: Callable[[], os.stat_result], rounds: int = 1
) -> float:
    """The best rate of ``stat`` of a probe mount's root through one transport,
    in ``rounds`` rounds of :data:`STATS` after a warm-up.

    Raises :class:`ProbeError` if it cannot tell, including when io_uring was
    asked for and the kernel did not agree to it: the figure would be
    /dev/fuse's.
    """
    with _probe_mount() as (directory, device), _quiet():
        loop = RequestLoop(
            cast("Operations", _RootOnly(root_stat)), device, busy_poll_us, False, io_uring
        )
        failure: list[BaseException] = []
        server = threading.Thread(
            target=_run_catching, args=(loop, failure), name="probe", daemon=True
        )
        server.start()
        try:
            rates = _time_client(directory, rounds)
        finally:
            loop.stop()
            server.join(_CLIENT_TIMEOUT)
            if not server.is_alive():  # else it may still use the loop's pipe
                loop.close()
        if failure:
            raise ProbeError(f"the probe's request loop failed: {failure[0]}")
        if server.is_alive():
            raise ProbeError("the probe's request loop did not stop")
        if io_uring and not loop.io_uring:
            raise ProbeError("the kernel did not agree to FUSE over io_uring")
        if io_uring and not any(queue.served for queue in loop.queues):
            raise ProbeError("the io_uring queues answered no request")
    _join_queues(loop)
    return max(rates)


def _run_catching(loop: RequestLoop, failure: list[BaseException]) -> None:
    try:
        loop.run()
    except BaseException as exc:  # reported by the caller
        failure.append(exc)


def _time_client(directory: str, rounds: int) -> list[float]:
    command = [sys.executable, "-I", "-S", "-c", _CLIENT, directory, str(STATS), str(rounds)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(
            f"{rounds} rounds of {STATS} stats took over {_CLIENT_TIMEOUT:g} s"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise ProbeError(f"the timing process failed (exit {done.returncode}): {last}")
    try:
        rates = [float(line) for line in done.stdout.split()]
    except ValueError:
        rates = []
    if len(rates) != rounds:
        raise ProbeError(f"the timing process said {done.stdout!r}")
    return rates


@contextlib.contextmanager
def _probe_mount() -> Iterator[tuple[str, int]]:
    """A mounted probe filesystem's directory and ``/dev/fuse`` descriptor;
    unmounted and removed afterwards, whatever happened."""
    directory = tempfile.mkdtemp(prefix="fusestore-probe-")
    try:
        try:
            pyfuse3.init(pyfuse3.Operations(), directory, set(_OPTIONS))
        except RuntimeError as exc:
            raise ProbeError(f"cannot mount a probe on {directory}: {exc}") from exc
        try:
            device = fuse_device_fd()
            if device is None:
                raise ProbeError("no single /dev/fuse descriptor after mounting the probe")
            yield directory, device
        finally:
            pyfuse3.close(unmount=True)
    finally:
        _detach_if_mounted(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _detach_if_mounted(directory: str) -> None:
    """Last resort: if ``pyfuse3.close`` left the probe mounted, detach it."""
    try:
        with open("/proc/self/mountinfo") as mounts:
            mounted = any(line.split()[4] == directory for line in mounts)
    except OSError:
        mounted = True
    if not mounted:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(directory.encode(), _MNT_DETACH) != 0:
        log.error("cannot unmount the probe %s: %s", directory, os.strerror(ctypes.get_errno()))


def _join_queues(loop: RequestLoop) -> None:
    """Let the io_uring queue threads see that their mount is gone and end."""
    deadline = time.monotonic() + 1.0
    for queue in loop.queues:
        queue.thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The probe's request loop does not log its INIT and queues at INFO: the
    log's ``requests through`` lines are the pool's."""
    loggers = [
        logging.getLogger(name) for name in ("fusestore.fuse.requestloop", "fusestore.fuse.uring")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
