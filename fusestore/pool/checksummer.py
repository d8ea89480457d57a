"""Checksums of new files, computed in the background once they are published.

Why after publication, by reading the file back, rather than from each WRITE
as it arrives: on the project's machine md5 alone hashes 790 MiB/s on one
CPU and md5 + sha256 550 MiB/s, while the pool takes sequential writes at
about 1,800 MiB/s; any checksum finished by ``close()`` would cap writes at
the hash's speed. Read back from the page cache right after the write (md5
and sha256 of 1 GiB read back from tmpfs: 521 MiB/s; from memory: 562), the
digests are right whatever the order of the writes — random offsets,
``mmap``, truncation, a rewrite — because they are computed from the file as
it was closed, and the writer never waits. A file is changed through the
pool only by a handle the pool knows of (``pool.py`` cancels the job and
drops the old checksums before), or behind its back (the stamp check below
catches that).

One worker thread, at a lower CPU priority than the request threads, so a
burst of writes runs at full speed and the checksums follow. Jobs are keyed
by the backing path of the file; the pool tells the checksummer about
renames, removals and writes so that no job ever stores a checksum of bytes
that changed while it read them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fusestore.pool import checksums

log = logging.getLogger(__name__)

# A file whose bytes change while it is read (``touch`` right after ``close``,
# rsync setting times) is read again, this many times at most.
_ATTEMPTS = 3
# The worker's nice value: writes first, checksums with what CPU is left.
_NICENESS = 10
# How long unmounting waits for a read in progress (a hung disk must not keep
# the daemon from exiting).
_STOP_WAIT = 5


@dataclass(eq=False)
class _Job:
    path: str
    algorithms: tuple[str, ...]
    new_file: bool = False  # just written through the pool: no record to replace
    cancelled: bool = False
    attempts: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class Checksummer:
    """A queue of files to checksum, and the thread that works through it."""

    def __init__(
        self,
        hung: Callable[[str], bool] = lambda path: False,
        read_failed: Callable[[str, OSError], None] | None = None,
        close: Callable[[int], None] = os.close,
    ) -> None:
        # Whether a path is in a hung datadir (health.py): the thread then
        # leaves the file alone rather than wait in it holding its lock,
        # which the requests that publish, rename and unlink files need.
        self._hung = hung
        # Told of a file that could not be read (its datadir counts it).
        self._read_failed = read_failed
        # How a file read is closed (the pool's closer process, closer.py).
        self._close = close
        self._lock = threading.Condition(threading.Lock())
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}  # by path: queued or being read
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checksums", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the chunk being read; files not done stay without checksums
        (``fusestore verify --fill`` computes them)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(_STOP_WAIT)
            if self._thread.is_alive():
                log.warning("the checksum thread is stuck reading a file: not waiting for it")

    def add(self, path: str, algorithms: Sequence[str], new_file: bool = False) -> None:
        """Checksum the file at ``path`` as it is once the worker gets to it."""
        if not algorithms:
            return
        with self._lock:
            old = self._jobs.get(path)
            if old is not None:
                self._finish(old, cancelled=True)
            job = self._jobs[path] = _Job(path, tuple(algorithms), new_file)
            self._queue.append(job)
            self._lock.notify()

    def cancel(self, path: str) -> None:
        """The file at ``path`` is about to change or go: store nothing for it."""
        with self._lock:
            job = self._jobs.get(path)
            if job is not None:
                self._finish(job, cancelled=True)

    def renamed(self, old: str, new: str) -> None:
        """A file with a job moved from ``old`` to ``new`` (in one datadir)."""
        with self._lock:
            job = self._jobs.pop(old, None)
            if job is None:
                return
            replaced = self._jobs.get(new)
            if replaced is not None:
                self._finish(replaced, cancelled=True)
            job.path = new
            self._jobs[new] = job

    def pending(self, path: str) -> threading.Event | None:
        """What to wait on until the checksums of ``path`` are stored, if they are due."""
        with self._lock:
            job = self._jobs.get(path)
            return None if job is None else job.done

    def backlog(self) -> int:
        """Files waiting for their checksums (``fusestore status``)."""
        with self._lock:
            return len(self._jobs)

    def _finish(self, job: _Job, cancelled: bool = False) -> None:
        """End a job (the lock is held): waiters go on."""
        job.cancelled = job.cancelled or cancelled
        if self._jobs.get(job.path) is job:
            del self._jobs[job.path]
        job.done.set()

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICENESS)
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    for job in list(self._jobs.values()):
                        self._finish(job, cancelled=True)
                    return
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                if self._hung(job.path):
                    log.warning(
                        "%s left without checksums: its datadir is hung "
                        "('fusestore verify --fill' computes them)",
                        job.path,
                    )
                    self._finish(job)
                    continue
                # Opened under the lock: a rename cannot slip in between the
                # path and the descriptor; from here on the descriptor holds.
                try:
                    fd = checksums.open_to_read(job.path)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.error("cannot read %s to checksum it: %s", job.path, exc.strerror)
                    self._finish(job)
                    continue
            try:
                self._checksum(job, fd)
            except OSError as exc:
                if self._read_failed is None:
                    log.error("cannot read %s to checksum it: %s", job.path, exc.strerror)
                else:
                    self._read_failed(job.path, exc)
                with self._lock:
                    self._finish(job)
            except Exception:
                log.exception("checksumming %s failed", job.path)
                with self._lock:
                    self._finish(job)
            finally:
                self._close(fd)

    def _checksum(self, job: _Job, fd: int) -> None:
        before = os.fstat(fd)
        digests = checksums.compute(
            fd, job.algorithms, before.st_size, lambda _: job.cancelled or self._stopping
        )
        after = os.fstat(fd)
        stamp = checksums.Stamp.of(before)
        with self._lock:
            if job.cancelled or self._stopping:
                self._finish(job)
                return
            if (
                digests is not None
                and stamp == checksums.Stamp.of(after)
                and not self._hung(job.path)
            ):
                try:
                    checksums.write_record(fd, checksums.Record(stamp, digests), job.new_file)
                except OSError as exc:
                    log.error("cannot store the checksums of %s: %s", job.path, exc.strerror)
                else:
                    log.debug("checksummed %s: %s", job.path, digests)
                self._finish(job)
                return
            job.attempts += 1
            if job.attempts >= _ATTEMPTS:
                log.warning(
                    "%s kept changing while it was checksummed: left without checksums "
                    "('fusestore verify --fill' computes them)",
                    job.path,
                )
                self._finish(job)
                return
            self._queue.append(job)  # read it again, after the others
