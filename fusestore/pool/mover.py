"""Moving a file from one datadir to another while the pool serves it.

Used by drain and balance (``fusestore/service/jobs.py``). A move has three
steps, and only the first and last hold the pool's request lock, for a few
system calls each, so requests never wait behind a copy:

1. :func:`prepare` (locked): the file must not be open for writing or
   being written, and no third datadir may hold its name; a descriptor of
   the source and a new file in the target's private area are opened.
2. :func:`copy` (unlocked): the bytes are copied in the kernel
   (``copy_file_range``, or ``sendfile`` between two filesystems), each
   chunk read back and compared with the source beside the next one's copy;
   then the extended attributes (the checksum record among them), owner,
   mode and times, so the record's stamp still matches; the copy is
   ``fsync``ed.
3. :func:`finish` (locked): if the source is unchanged (same inode,
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
import logging
import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fusestore.pool import attributes, checksums
from fusestore.pool.datadirs import Datadir, start_private_area
from fusestore.pool.openfiles import NEW_FILE_FLAGS, OpenFile
from fusestore.pool.pool import Pool
from fusestore.pool.private import sync_directory
from fusestore.pool.spillover import copy_range

log = logging.getLogger(__name__)

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
            done = copy_range(work.source_fd, work.copy_fd, length, offset, offset)
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


def _being_written(open_file: OpenFile | None) -> bool:
    return open_file is not None and (open_file.new or open_file.has_writer())


def _skip_if_hung(*datadirs: Datadir) -> None:
    """Under the request lock, a hung datadir (``health.py``) is not asked: it
    would hold the lock, and every request, for as long as it is silent."""
    for datadir in datadirs:
        if datadir.hung:
            raise MoveSkipped(f"{datadir.path} is hung")


def prepare(pool: Pool, name: str, source: Datadir, target: Datadir) -> MoveWork:
    """Step 1, under the request lock: MoveSkipped if the file cannot move now."""
    _skip_if_hung(source, target)
    if _being_written(pool.open_file(name)):
        raise MoveSkipped("it is open for writing")
    others = [c.datadir.path for c in pool.copies(name) if c.datadir not in (source, target)]
    if others:
        raise MoveSkipped(f"{', '.join(others)} hold(s) that name too (see 'fusestore check')")
    if not target.takes_new_files():
        raise MoveSkipped(f"{target.path} takes no files ({target.state.value})")
    try:
        source_fd = checksums.open_to_read(source.path_of(name))
    except FileNotFoundError:
        raise MoveSkipped("it was removed") from None
    before = os.fstat(source_fd)
    if not stat.S_ISREG(before.st_mode):
        os.close(source_fd)
        raise MoveSkipped("it is not a regular file any more")
    if target.free_bytes - before.st_size <= pool.min_free_space:
        os.close(source_fd)
        raise MoveSkipped(f"{target.path} has no room for it above the reserve")
    start_private_area(target)
    copy_path = target.private.new_incoming_path()
    try:
        copy_fd = os.open(copy_path, NEW_FILE_FLAGS, 0o600)
    except OSError:
        os.close(source_fd)
        raise
    return MoveWork(name, source, target, source_fd, copy_fd, copy_path, before)


def finish(pool: Pool, work: MoveWork) -> None:
    """Step 3, under the request lock: publish the checked copy in the target
    and remove the source, or MoveSkipped and change nothing.

    The caller then calls :func:`abandon`, *outside* the lock: closing the
    last descriptor of the removed source frees its pages, which takes tens
    of milliseconds per GiB.
    """
    name, source_path = work.name, work.source_path
    _skip_if_hung(work.source, work.target)
    try:
        now = os.stat(source_path, follow_symlinks=False)
    except FileNotFoundError:
        raise MoveSkipped("it was removed during its copy") from None
    if not checksums.unchanged(work.before, now):
        raise MoveSkipped("it changed during its copy")
    open_file = pool.open_file(name)
    if _being_written(open_file):
        raise MoveSkipped("it was opened for writing during its copy")
    final = work.target.path_of(name)
    try:
        os.link(work.copy_path, final)  # never replaces
    except FileExistsError:
        # A copy left by an interrupted move of this file: the same bytes
        # are already there, so only the source has to go.
        if not same_contents(final, work.source_fd, work.before.st_size):
            raise MoveSkipped(f"{work.target.path} holds another file of that name") from None
    if pool.sync:
        sync_directory(work.target.path)
    work.target.names.add(name)
    pool.checksummer.cancel(source_path)
    os.unlink(source_path)
    work.source.names.remove(name)
    if pool.sync:
        sync_directory(work.source.path)
    if open_file is not None and open_file.path == source_path:
        # Readers keep their descriptors (same bytes); new opens go to the target.
        open_file.path, open_file.datadir = final, work.target.path
    log.info(
        "moved %r (%d bytes) from %s to %s",
        name,
        work.before.st_size,
        work.source.path,
        work.target.path,
    )


def abandon(work: MoveWork) -> None:
    """Drop a move's private copy and descriptors (nothing else changed)."""
    work.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(work.copy_path)  # its hidden name; published, it has its own
