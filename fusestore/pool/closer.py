"""Close backing files in a process of their own, so no thread of ours waits.

Why: closing a file makes its filesystem flush it, and on a FUSE datadir
(GlusterFS, sshfs, any FUSE disk) the kernel waits for that flush without
letting the waiting thread go, not even when the process is killed. A
``close()`` that meets a datadir just as it hangs would keep its request
thread — and so the whole daemon, which cannot finish exiting while one of
its threads is stuck — for as long as the datadir is silent.

So the pool hands each descriptor of a file it is done with to the
*closer*: a child process made at start with ``clone(CLONE_FILES)``, which
shares the daemon's table of descriptors and closes them there. The daemon
writes the number on a pipe and goes on; the number stays taken until the
closer has closed it, so it cannot be reused meanwhile. A closer stuck in a
hung datadir holds up only the closes queued behind it, until the datadir
answers.

It ends as soon as the daemon has ended, every thread of it (a pidfd of the
daemon becomes readable then): only then is it the
last holder of the table, and its own exit closes what is left — in a hung
datadir, waiting as long as the datadir does, as a process that holds
nothing else — while the daemon's exit closes nothing and never waits. (Not
``PR_SET_PDEATHSIG``: that fires when the *thread* that made the child ends,
while other threads of the daemon may still be closing the table.)

``os.fork`` cannot share the table, hence the raw ``clone``; it is made
while the daemon has one thread, so the child may run Python safely.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import select
import signal
import struct
import time

log = logging.getLogger(__name__)

_CLONE_FILES = 0x400
_PR_SET_NAME = 15
# The closer's process name (at most 15 bytes).
CLOSER_NAME = b"fusestore-close"
# Seconds stop() waits for the closer to end.
_STOP_WAIT = 1.0
_QUIT = -1  # the number that tells the closer to end without closing anything
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
_FD = struct.Struct("=i")


def clone_sharing_descriptors() -> int:
    """``fork()``, but parent and child share one table of descriptors; -1
    where ``clone`` is not known here. Call it only while single-threaded."""
    number = _SYS_CLONE.get(platform.machine())
    if number is None:
        return -1
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    zero = ctypes.c_ulong(0)
    flags = ctypes.c_ulong(_CLONE_FILES | signal.SIGCHLD)
    return int(libc.syscall(ctypes.c_long(number), flags, zero, zero, zero, zero))


class Closer:
    """Closes descriptors in a child process that shares them (see the module)."""

    def __init__(self) -> None:
        self._write: int | None = None
        self.pid: int | None = None

    def start(self) -> None:
        """Make the closer process; without it, :meth:`close` closes here."""
        read, write = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = clone_sharing_descriptors()
        if pid == 0:
            _serve(read, parent)  # never returns
        if pid < 0:
            os.close(read)
            os.close(write)
            log.warning("no closer process on %s: files are closed by requests", platform.machine())
            return
        os.set_blocking(write, False)
        self._write, self.pid = write, pid

    def stop(self) -> None:
        """End the closer, when no datadir hangs: the daemon's exit can then
        close its own descriptors, and nothing of it lingers. A closer busy
        in a hung datadir is left to end on its own."""
        if self._write is None or self.pid is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._write, _FD.pack(_QUIT))
        deadline = time.monotonic() + _STOP_WAIT
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break  # already reaped
            time.sleep(0.01)
        else:
            log.warning("the closer process %d is still closing a file: left to end", self.pid)
        os.close(self._write)
        self._write = self.pid = None

    def close(self, fd: int) -> None:
        """Have ``fd`` closed; at once here if the closer cannot take it."""
        if self._write is not None:
            try:
                os.write(self._write, _FD.pack(fd))
                return
            except BlockingIOError:
                log.warning("the closer is behind (a hung datadir?): closing here")
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
        os.close(fd)


def _rename(name: bytes) -> None:
    """Show ``name`` as this process's name (``ps -o comm``, ``top``); its
    command line stays the daemon's (changing that needs CAP_SYS_RESOURCE)."""
    ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _serve(read: int, parent: int) -> None:
    """The closer process: close each descriptor named on ``read``."""
    try:
        _rename(CLOSER_NAME)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # systemd signals the whole unit
        # Readable once the daemon has ended, every thread of it.
        daemon = os.pidfd_open(parent)
        waiting = select.poll()
        waiting.register(read, select.POLLIN)
        waiting.register(daemon, select.POLLIN)
        pending = b""
        while True:
            ready = {fd for fd, _ in waiting.poll()}
            if daemon in ready:
                return  # the last holder of the table: exiting closes it
            pending += os.read(read, 4096)
            usable = len(pending) - len(pending) % _FD.size
            for (fd,) in _FD.iter_unpack(pending[:usable]):
                if fd == _QUIT:
                    return  # its share of the table goes; nothing is closed
                with contextlib.suppress(OSError):
                    os.close(fd)
            pending = pending[usable:]
    finally:
        os._exit(0)
