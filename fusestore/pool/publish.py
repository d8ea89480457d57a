"""Publication: a new file takes its name when its last handle closes, or never.

A new file is written under a hidden name in its datadir's private area. At
the close that leaves it without other handles it is ``fsync``ed (unless
``no_sync``) and linked under its name — ``link`` fails rather than replace,
so a name taken meanwhile by another program or daemon is never overwritten
— and the datadir is ``fsync``ed. A file whose write failed is removed, as
Glance's driver does; so is a file written through passthrough (the pool
sees none of its writes, nor their errors) whose datadir is full at its
close. A file whose name was taken meanwhile, or whose link failed, is kept
aside in ``kept/`` with its bytes whole.

These functions change only the :class:`OpenFile` and the files; the pool
keeps its table of open files in step with what they leave behind.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from fusestore.pool.datadirs import Datadir, note_failure
from fusestore.pool.errors import failure
from fusestore.pool.openfiles import Handle, OpenFile
from fusestore.pool.private import sync_directory

log = logging.getLogger(__name__)


def finish_new_file(
    open_file: OpenFile, datadir: Datadir, name_taken: Callable[[str], bool], sync: bool
) -> None:
    """Publish a new file under its name, or remove it, or keep it aside.

    Removed: it was unlinked while open, or a write (or the final fsync)
    failed, so it is incomplete. Kept aside in the private area: its name
    was taken meanwhile (``name_taken``), or publishing failed, so the bytes
    are whole but have no name; nothing that was written completely is lost.
    Raises the error ``close()`` reports; the file has then lost its name
    (kept aside) or its path (removed).
    """
    hidden, name = open_file.path, open_file.name
    assert hidden is not None
    if name is None:
        drop_hidden_name(open_file)
        return
    if open_file.error is None and open_file.kernel_writes and _out_of_room(datadir):
        # Its writer may have got ENOSPC from the kernel, which the pool never saw.
        open_file.note_write_error(OSError(errno.ENOSPC, "its datadir ran out of room"))
    if open_file.error is None and sync and (open_file.dirty or open_file.kernel_writes):
        try:
            os.fsync(open_file.any_fd())
            open_file.dirty = False
        except OSError as exc:
            note_failure(datadir, open_file, "write", exc)
            open_file.note_write_error(exc)
    open_file.new = False
    if open_file.error is not None:
        open_file.path = None
        # Free the space now: handles may outlive this close by a moment.
        os.truncate(hidden, 0)
        os.unlink(hidden)
        log.warning("removed incomplete new file %r after a failed write", name)
        raise failure(open_file.error or errno.EIO, f"{name!r} was not stored")
    final_path = datadir.path_of(name)
    try:
        if name_taken(name):
            raise FileExistsError(errno.EEXIST, "its name was taken meanwhile")
        os.link(hidden, final_path)  # unlike rename, never replaces
    except OSError as exc:
        keep_aside(open_file, datadir, name, str(exc))
        if isinstance(exc, FileExistsError):
            raise failure(errno.EEXIST, f"{name!r} appeared in the pool meanwhile") from None
        raise
    open_file.path = final_path
    os.unlink(hidden)
    if sync:
        sync_directory(datadir.path)
    log.debug("published %r in %s", name, datadir.path)


# Free space below which a datadir counts as having run out of room: a write
# refused with ENOSPC leaves less than the block it could not write.
FULL_BELOW_BYTES = 1 << 20


def _out_of_room(datadir: Datadir) -> bool:
    """Whether ``datadir`` is (nearly) full: a file written through passthrough
    may then have met ENOSPC, and must not be published as if whole."""
    try:
        st = os.statvfs(datadir.path)
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < FULL_BELOW_BYTES


def keep_aside(open_file: OpenFile, datadir: Datadir, name: str, reason: str) -> None:
    """Move a file that cannot be published into ``kept/``; it loses its name."""
    hidden = open_file.path
    assert hidden is not None
    try:
        kept = datadir.private.keep_aside(hidden, name)
    except OSError as exc:
        kept = hidden  # still safe from the leftover sweep while we run
        log.error("cannot move %s into the kept area: %s", hidden, exc.strerror)
    open_file.path, open_file.new, open_file.name = kept, False, None
    log.error("%r could not be published (%s): its data is kept in %s", name, reason, kept)


def drop_hidden_name(open_file: OpenFile) -> None:
    """A new file unlinked while open loses its hidden name at its last close().

    That is flush, not release: release comes after close() has returned,
    and the file would stay in the private area a moment after the program
    is done with it. Descriptors that survive this close (dup'ed) keep the
    bytes until they close too, as on any disk.
    """
    assert open_file.path is not None
    os.unlink(open_file.path)
    open_file.path, open_file.new = None, False


def take_back(handle: Handle, datadir: Datadir) -> None:
    """A file published at an early close() is written again: hide it again,
    until the next close, so that a crash meanwhile leaves no half-written
    file under its name."""
    handle.published_early = False
    open_file = handle.open_file
    if open_file.new or open_file.path is None or open_file.name is None:
        return
    try:
        on_disk = os.stat(open_file.path, follow_symlinks=False)
    except FileNotFoundError:
        return
    mine = os.fstat(handle.fd)
    if (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
        return  # someone else's file has that name now
    hidden = datadir.private.new_incoming_path()
    os.rename(open_file.path, hidden)
    open_file.path, open_file.new = hidden, True
    log.debug("%r is written again after an early close: hidden until the next one", open_file.name)
