"""Open files and their handles, built so that a file can move while open.

Every open of a file through the mount gets a :class:`Handle` with its own
backing file descriptor (so each keeps the access mode it asked for). All
handles of one file share one :class:`OpenFile`, which records where the bytes
live *now*: the datadir and the backing path. Nothing outside this module keeps
a backing path of an open file, so publishing a file under its real name or
moving it to another datadir in the middle of a write only has to update the
:class:`OpenFile` and swap each handle's descriptor in place (``dup2`` keeps
the number), without the FUSE layer noticing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Every backing descriptor: symlinks in a datadir are never followed.
BACKING_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
# A new file under its hidden name (the daemon's own: mode 0600 until set).
NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR | BACKING_FLAGS


@dataclass(eq=False)
class OpenFile:
    """A file that has at least one open handle.

    A *new* file (``new`` is true) lives under a hidden name in its datadir's
    private area until it is published under ``name`` or discarded.
    ``name`` is ``None`` once the file was unlinked or replaced by a rename
    while open: its handles keep working, as POSIX promises, but it has no
    place in the pool any more; a new file in that state is discarded at
    close. ``path`` is ``None`` when no path reaches the bytes any more.
    ``error`` is the errno of a failed write to a new file: such a file is
    removed at close instead of being published. ``failed``: the kinds of
    request ("read", "write") that failed on it and were logged, once each.
    """

    name: str | None
    datadir: str
    path: str | None
    new: bool = False
    dirty: bool = False  # written since the last fsync
    error: int | None = None
    handles: set[Handle] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    # A writer's bytes went straight to the backing file through FUSE
    # passthrough (set by the FUSE side, never cleared): the pool saw neither
    # those writes nor their errors.
    kernel_writes: bool = False
    # The kernel reads and writes it through FUSE passthrough (set by the
    # FUSE side): its backing file must stay the one the kernel was given.
    in_passthrough: bool = False

    def detach(self) -> None:
        """Forget the name: the directory entry is gone (a new file keeps its hidden path)."""
        self.name = None
        if not self.new:
            self.path = None

    def note_write_error(self, exc: OSError) -> None:
        """Record a failed write: a new file is then incomplete and removed at close.

        EACCES is the caller's business, not the file's: the file stays.
        """
        if self.new and exc.errno != errno.EACCES:
            self.error = self.error or exc.errno
            if "write" not in self.failed:
                self.failed.add("write")
                log.error("write to new file %r failed: %s", self.name, exc)

    def log_failure(self, kind: str, exc: OSError) -> None:
        """Log a failed ``kind`` ("read", "write") of the file's datadir, once
        per file and kind: a program may retry a bad block many times."""
        if kind in self.failed:
            return
        self.failed.add(kind)
        log.error(
            "datadir %s: %s of %r failed: %s",
            self.datadir,
            kind,
            self.name or "(unlinked file)",
            exc.strerror or exc,
        )

    def has_writer(self, besides: Handle | None = None) -> bool:
        """Whether a handle (other than ``besides``) may write to the file."""
        return any(h.writable for h in self.handles if h is not besides)

    def any_fd(self) -> int:
        """A descriptor of the file, for fstat and friends."""
        return next(iter(self.handles)).fd


def without_set_id_bits(mode: int) -> int:
    """``mode`` less setuid, and less setgid where the group may execute: what
    a write, truncate or chown by someone without CAP_FSETID leaves."""
    kept = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        kept &= ~stat.S_ISGID
    return kept


@dataclass(eq=False)
class Handle:
    """One open of a file; ``fd`` is its backing descriptor."""

    open_file: OpenFile
    fd: int
    flags: int  # the backing open(2) flags, to reopen the file where it moves
    writable: bool
    # This handle created the file and published it at a close() while
    # descriptors of it stayed open (a fork, a dup): writing through it again
    # takes the file back under its hidden name until the next close.
    published_early: bool = False

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        """Write all of ``data``: FUSE without direct_io must never write short."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    def drop_set_id_bits(self) -> bool:
        """Clear setuid, and setgid where the group may execute, as a local
        filesystem does when someone without CAP_FSETID writes; whether the
        mode changed.

        The daemon writes as root, so the backing filesystem would keep them.
        """
        mode = os.fstat(self.fd).st_mode
        kept = without_set_id_bits(mode)
        if kept == mode:
            return False
        os.fchmod(self.fd, stat.S_IMODE(kept))
        return True

    def fsync(self, datasync: bool) -> None:
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)
