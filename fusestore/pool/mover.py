"""Moving a file from one datadir to another while the pool serves it.

Used by drain and balance (``fusestore/service/jobs.py``). A move has three
steps, and only the first and last hold the pool's request lock, for a few
system calls each, so requests never wait behind a copy:

1. ``Pool.prepare_move`` (locked): the file must not be open for writing or
   being written, and no third datadir may hold its name; a descriptor of
   the source and a new file in the target's private area are opened.
2. :func:`copy` (unlocked): the bytes are copied in the kernel
   (``copy_file_range``, or ``sendfile`` between two filesystems), each
   chunk read back and compared with the source beside the next one's copy;
   then the extended attributes (the checksum record among them), owner,
   mode and times, so the record's stamp still matches; the copy is
   ``fsync``ed.
3. ``Pool.finish_move`` (locked): if the source is unchanged (same inode,
   size, mtime and ctime — an attribute or checksum stored meanwhile counts
   as a change) and nobody opened it for writing, the copy is linked under
   its name in the target (``link`` never replaces), the source removed,
   and open readers' future opens sent to the target; otherwise the copy is
   dropped and the file stays where it was.

At every instant the name has at least one complete copy, and two copies
exist only between the ``link`` and the ``unlink`` of step 3, with the same
bytes. A crash leaves at most the copy in the private area (swept at the
next mount) or, between those two calls, two identical copies (``fusestore
check --fix`` keeps the one reads see; a rerun removes the source).
Readers that have the file open keep their descriptors of the source,
which stay valid after the ``unlink``: they read the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fusestore.pool import attributes, checksums
from fusestore.pool.datadirs import Datadir

# copy_file_range per call: small enough to stop promptly and to pace.
_CHUNK = 8 << 20
# With fsync on, the copy is written out every this many bytes: a journalled
# filesystem (ext4) makes any other fsync wait until all dirty data of its
# transaction is out, so a publication's fsync (under the request lock)
# would otherwise wait for the whole unsynced copy.
_SYNC_EVERY = 32 << 20


class MoveSkipped(Exception):
    """This file is not moved now (the reason is the message); nothing changed."""


@dataclass(eq=False)
class MoveWork:
    """A move between its steps: what it holds open and what it found."""

    name: str
    source: Datadir
    target: Datadir
    source_fd: int
    copy_fd: int
    copy_path: str
    before: os.stat_result  # the source when the move began

    @property
    def source_path(self) -> str:
        return self.source.path_of(self.name)

    def close(self) -> None:
        for fd in (self.source_fd, self.copy_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def unchanged(before: os.stat_result, now: os.stat_result) -> bool:
    """Same file, same bytes, same attributes (ctime moves with any change)."""
    fields = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
    return all(getattr(before, f) == getattr(now, f) for f in fields)


def copy(work: MoveWork, sync: bool, on_bytes: Callable[[int], bool] = lambda _: False) -> None:
    """Copy the bytes and attributes into the private copy and check it;
    ``on_bytes(n)`` after each chunk returns True to stop. MoveSkipped when
    the copy does not hold the file's bytes (or was stopped).

    Each chunk is read back and checked by a second thread while the next
    one is copied: hashing alone runs slower than a copy in the kernel, so
    one after the other would halve the rate.
    """
    size = work.before.st_size
    checker = _Checker(work)
    try:
        offset = 0
        while offset < size:
            length = min(_CHUNK, size - offset)
            try:
                done = os.copy_file_range(work.source_fd, work.copy_fd, length, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                os.lseek(work.copy_fd, offset, os.SEEK_SET)
                done = os.sendfile(work.copy_fd, work.source_fd, offset, length)
            if done == 0:
                raise MoveSkipped("it shrank during its copy")
            checker.check(offset, done)
            offset += done
            if sync and offset % _SYNC_EVERY < done:
                os.fdatasync(work.copy_fd)
            if on_bytes(done):
                raise MoveSkipped("stopped")
        attributes.copy_all(work.source_fd, work.copy_fd)
        st = work.before
        os.fchown(work.copy_fd, st.st_uid, st.st_gid)
        os.fchmod(work.copy_fd, stat.S_IMODE(st.st_mode))
        os.utime(work.copy_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if sync:
            os.fsync(work.copy_fd)
        checker.verdict()
    finally:
        checker.close()


class _Checker:
    """Reads back what was copied and compares it with the source, in a
    thread of its own, while the next chunk is copied.

    Byte for byte against the source rather than against the checksum
    record: on the project's VM a copy checked by sha256 moved 1,146 MiB/s,
    one compared with its source 1,731 (``cp`` between the two datadirs:
    1,850). A source that had rotted before the move is still caught: its
    record moves with it unchanged, so ``fusestore verify`` reports it where
    it lands.
    """

    def __init__(self, work: MoveWork) -> None:
        self.work = work
        self.differs = False
        # Reused buffers: a fresh 8 MiB object per chunk costs its page faults.
        length = min(_CHUNK, max(work.before.st_size, 1))
        self.copied, self.original = bytearray(length), bytearray(length)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="move check")
        self.pending: deque[Future[None]] = deque()

    def check(self, offset: int, length: int) -> None:
        """Compare this chunk soon; one chunk at a time behind the copy."""
        while self.pending:
            self.pending.popleft().result()
        self.pending.append(self.worker.submit(self._check, offset, length))

    def _check(self, offset: int, length: int) -> None:
        copied, original = self.copied, self.original
        if length < len(copied):
            copied, original = bytearray(length), bytearray(length)
        got = os.preadv(self.work.copy_fd, [copied], offset)
        expected = os.preadv(self.work.source_fd, [original], offset)
        if got != length or expected != length or copied != original:
            self.differs = True

    def verdict(self) -> None:
        """MoveSkipped unless every chunk was the same."""
        while self.pending:
            self.pending.popleft().result()
        if self.differs:
            raise MoveSkipped("its copy differs from it")

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


def _same_bytes(one: int, other: int, size: int) -> bool:
    offset = 0
    while offset < size:
        length = min(checksums.CHUNK, size - offset)
        if os.pread(one, length, offset) != os.pread(other, length, offset):
            return False
        offset += length
    return True


def same_contents(path: str, fd: int, size: int) -> bool:
    """Whether the file at ``path`` holds the ``size`` bytes of ``fd`` (a
    target that already has the name: a copy left by an interrupted move)."""
    try:
        other = checksums.open_to_read(path)
    except OSError:
        return False
    try:
        return os.fstat(other).st_size == size and _same_bytes(fd, other, size)
    finally:
        os.close(other)
