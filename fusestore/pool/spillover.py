"""Spill-over: an open file whose datadir fills up moves to another one.

A write that meets ``ENOSPC`` or ``EFBIG`` does not fail while another
datadir can hold the file: its bytes are copied there in the kernel
(``sendfile``), and every open handle's descriptor is swapped in place
(``dup2`` keeps the number), so the writer and every other handle of the
file notice nothing. The name never disappears: a published file is linked
under its name in the target before the old copy goes. A new file whose
write fails with EIO leaves its failing datadir the same way (``pool.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from fusestore.pool import attributes
from fusestore.pool.datadirs import Datadir, start_private_area
from fusestore.pool.openfiles import NEW_FILE_FLAGS, OpenFile

log = logging.getLogger(__name__)

# The errors that mean "this datadir cannot hold the file", not a broken write.
NO_ROOM = (errno.ENOSPC, errno.EFBIG)
_COPY_CHUNK = 8 << 20

# The pool's placement: (name, bytes needed, datadirs to leave out) -> datadir.
ChooseDatadir = Callable[[str, int, frozenset[str]], Datadir]


def copy_range(
    source_fd: int, target_fd: int, length: int, source_offset: int, target_offset: int
) -> int:
    """Copy up to ``length`` bytes in the kernel; how many (0: the source ends).

    ``copy_file_range`` (a reflink where the filesystem can), or ``sendfile``
    where the kernel refuses it between two filesystems (two tmpfs, say).
    """
    try:
        return os.copy_file_range(source_fd, target_fd, length, source_offset, target_offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    os.lseek(target_fd, target_offset, os.SEEK_SET)
    return os.sendfile(target_fd, source_fd, source_offset, length)


def copy_bytes(source_fd: int, target_fd: int, size: int) -> None:
    """Copy ``size`` bytes from the start of one file to another, in the kernel."""
    offset = 0
    while offset < size:
        sent = copy_range(source_fd, target_fd, min(_COPY_CHUNK, size - offset), offset, offset)
        if sent == 0:
            break  # the source shrank meanwhile
        offset += sent


def move_to_another_datadir(
    open_file: OpenFile, needed: int, tried: set[str], choose: ChooseDatadir, why: str = "full"
) -> None:
    """Move the file to the best datadir not yet tried; ENOSPC when none can hold it.

    ``choose(name, needed_bytes, exclude)`` is the pool's placement, which
    raises ENOSPC (or EROFS) when no datadir qualifies. ``why`` the file
    leaves its datadir, for the log: "full" or "failing".
    """
    name = open_file.name or "(unlinked file)"
    while True:
        target = choose(name, needed, frozenset(tried))
        try:
            move_open_file(open_file, target, why=why)
            return
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            log.warning("datadir %s filled up while %r moved in", target.path, name)
            tried.add(target.path)


def _carry_attributes(source_fd: int, target_fd: int, name: str | None, target: Datadir) -> None:
    """The file's extended attributes go with its bytes; if the target keeps
    none, the bytes still move (they matter more) and the log says what was lost."""
    try:
        attributes.copy_all(source_fd, target_fd)
    except OSError as exc:
        log.error(
            "extended attributes of %r could not move with it to %s: %s",
            name or "(unlinked file)",
            target.path,
            exc.strerror,
        )


def move_open_file(
    open_file: OpenFile, target: Datadir, log_move: bool = True, why: str = "full"
) -> None:
    """Copy the bytes to ``target`` and swap every handle's descriptor in place.

    A new file stays hidden in the target's private area; a published one
    is linked under its name there before the old copy goes, so the name
    never disappears; one unlinked while open stays nameless.
    """
    source_fd = open_file.any_fd()
    source_path, source_datadir = open_file.path, open_file.datadir
    start_private_area(target)
    new_path = target.private.new_incoming_path()
    final_path = new_path
    new_fd = os.open(new_path, NEW_FILE_FLAGS, 0o600)
    try:
        st = os.fstat(source_fd)
        if os.geteuid() == 0:
            os.fchown(new_fd, st.st_uid, st.st_gid)
        os.fchmod(new_fd, stat.S_IMODE(st.st_mode))
        copy_bytes(source_fd, new_fd, st.st_size)
        _carry_attributes(source_fd, new_fd, open_file.name, target)
        if not open_file.new and source_path is not None and open_file.name is not None:
            final_path = target.path_of(open_file.name)
            os.link(new_path, final_path)
        for handle in open_file.handles:
            reopened = os.open(new_path, handle.flags)
            os.dup2(reopened, handle.fd)  # same number: the handle never notices
            os.close(reopened)
    except BaseException:
        os.close(new_fd)
        os.unlink(new_path)
        if final_path != new_path:
            os.unlink(final_path)
        raise
    os.close(new_fd)
    if open_file.new:
        open_file.path = new_path
    else:
        os.unlink(new_path)  # published: final_path holds it; orphaned: nothing does
        open_file.path = final_path if final_path != new_path else None
    if source_path is not None:
        try:
            os.unlink(source_path)
        except OSError as exc:
            if not open_file.new:
                raise
            # A failing disk: its incoming directory is swept at the next start.
            log.error("cannot remove %s after its move: %s", source_path, exc.strerror)
    if final_path != new_path and open_file.name is not None:
        target.names.add(open_file.name)  # the source's index keeps it: harmless
    open_file.datadir = target.path
    if not log_move:
        return
    log.warning(
        "moved %r (%d bytes) from %s datadir %s to %s",
        open_file.name or "(unlinked file)",
        st.st_size,
        why,
        source_datadir,
        target.path,
    )
