"""The backing datadirs as one flat namespace of files that are never lost.

The pool is the only code that touches the files in the datadirs. It knows no
FUSE: it takes names and returns stat results, handles and ``OSError``s with
the errno the caller should see. The datadirs are the only state; nothing is
cached about files that are not open, so programs that change the datadirs
directly are seen at the next request.

Namespace (README, "How it behaves": *One flat directory*): only regular
files are part of the pool and symlinks are never followed; a name is served
by the first datadir in priority order that holds it; ``unlink`` removes
every copy; ``rename`` renames every copy and removes the target's copies
elsewhere.

Writing (README, "How it behaves": *Crash-safe publication*, *Spill-over*): a
new file is written under a hidden name in its datadir's private area and
published under its name (fsync, then ``link``, which never replaces) when
its last handle closes. A write that finds its datadir full moves the file,
bytes and handles, to the best other datadir and goes on there. A new file
whose write failed for another reason is removed at close, as Glance's
driver does.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TypeVar

from fusestore.config import PoolConfig
from fusestore.datadirs import (
    Datadir,
    State,
    mark_and_sweep,
    open_datadirs,
    start_private_area,
)
from fusestore.listing import DatadirLister, is_large, regular_files_or_error
from fusestore.openfiles import Handle, OpenFile
from fusestore.placement import DatadirSpace, choose_datadir, lookup_order
from fusestore.private import PRIVATE_DIR, sync_directory

log = logging.getLogger(__name__)

T = TypeVar("T")

# Flags that describe how the *caller* opened the file and must not reach the
# backing descriptor: creation and truncation are done by the pool itself;
# O_APPEND is left to the kernel, which sends the right offset with each write;
# O_DIRECT is not supported by every backing filesystem (tmpfs refuses it).
_CALLER_ONLY_FLAGS = (
    os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY | os.O_DIRECT | os.O_ACCMODE
)
_BACKING_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR | _BACKING_FLAGS
_NO_ROOM = (errno.ENOSPC, errno.EFBIG)
# The longest file name Linux has (bytes): the kernel does not check names for
# FUSE, so the pool must.
NAME_MAX = 255
_COPY_CHUNK = 8 << 20
# Fewer names than this after a listing's first part are packed at once on
# the request thread: a worker thread is worth waking for large listings only.
_NAMES_FOR_A_WORKER = 4096


@dataclass(frozen=True)
class Copy:
    """A regular file of a given name in one datadir."""

    datadir: Datadir
    path: str
    stat: os.stat_result


@dataclass(frozen=True)
class PoolSpace:
    """What ``statfs`` reports: the datadirs' distinct filesystems added up."""

    block_size: int
    total_blocks: int
    free_blocks: int
    available_blocks: int
    total_inodes: int
    free_inodes: int
    name_max: int


def _fail(code: int, message: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {message}")


def name_limit(paths: list[str]) -> int:
    """The longest name (in bytes) every one of ``paths``' filesystems can hold.

    A new file must be publishable in whichever datadir it lands or is moved
    to, so the smallest ``f_namemax`` counts.
    """
    limits = []
    for path in paths:
        try:
            limits.append(os.statvfs(path).f_namemax)
        except OSError:
            continue  # a datadir that is not there now is checked when it is used
    return min([NAME_MAX, *limits])


def _copy_bytes(source_fd: int, target_fd: int, size: int) -> None:
    """Copy ``size`` bytes from the start of one file to another, in the kernel."""
    offset = 0
    while offset < size:
        sent = os.sendfile(target_fd, source_fd, offset, min(_COPY_CHUNK, size - offset))
        if sent == 0:
            break  # the source shrank meanwhile
        offset += sent


def _each_part(
    each: Callable[[list[bytes], int], T],
    parts: Iterator[list[bytes]],
    into: SimpleQueue[T | BaseException | None],
) -> None:
    """``each`` of every part, put in order into ``into``, then None (or what it raised)."""
    try:
        for index, names in enumerate(parts, start=1):
            into.put(each(names, index))
        into.put(None)
    except BaseException as exc:
        into.put(exc)
        raise


class Pool:
    """The datadirs of one mount, and the files open in them."""

    def __init__(self, config: PoolConfig, instance: str | None = None) -> None:
        """Validate every datadir, creating missing ones; ConfigError names the first bad one.

        Nothing else is written until :meth:`start`.
        """
        self.instance = instance or uuid.uuid4().hex
        self.datadirs: list[Datadir] = lookup_order(open_datadirs(config.datadirs, self.instance))
        self._datadir_by_path = {datadir.path: datadir for datadir in self.datadirs}
        self.min_free_space = config.min_free_space
        self.sync = config.sync
        self._open_files: dict[str, OpenFile] = {}
        self._lister = DatadirLister()
        self.name_max = name_limit([datadir.path for datadir in self.datadirs])

    def start(self) -> None:
        """Mark the datadirs and sweep the leftovers of writers that crashed."""
        mark_and_sweep(self.datadirs)

    def reconfigure(self, config: PoolConfig) -> None:
        """Apply a reloaded config at once, or raise ConfigError and change nothing.

        New datadirs join (marked, swept); priorities and the reserve change;
        a datadir dropped from the config takes no new files, but its files
        stay visible and usable until they are moved off.
        """
        added = open_datadirs(config.datadirs, self.instance, existing=self.datadirs)
        priorities = {spec.path: spec.priority for spec in config.datadirs}
        for datadir in self.datadirs:
            retired = datadir.path not in priorities
            if retired and not datadir.retired:
                log.warning("datadir %s was removed from the config: no new files", datadir.path)
            datadir.retired = retired
            datadir.priority = priorities.get(datadir.path, datadir.priority)
        for datadir in added:
            log.info("datadir %s (priority %d) joins the pool", datadir.path, datadir.priority)
        self.datadirs = lookup_order([*self.datadirs, *added])
        self._datadir_by_path = {datadir.path: datadir for datadir in self.datadirs}
        self.min_free_space = config.min_free_space
        self.sync = config.sync
        self.name_max = name_limit([datadir.path for datadir in self.datadirs])
        mark_and_sweep(self.datadirs)

    def stop(self) -> None:
        self._lister.stop()
        for datadir in self.datadirs:
            datadir.private.stop()

    def check_new_name(self, name: str) -> None:
        """Refuse a name the pool could not publish: before any byte is written."""
        if name == PRIVATE_DIR:
            raise _fail(errno.EPERM, f"{name!r} is reserved for fusestore's private area")
        length = len(os.fsencode(name))
        if length > self.name_max:
            raise _fail(
                errno.ENAMETOOLONG,
                f"a name of {length} bytes; the datadirs hold at most {self.name_max}",
            )

    # ----------------------------------------------------------------- lookup

    def copies(self, name: str) -> list[Copy]:
        """Every regular file called ``name``, winner first."""
        return list(self._iter_copies(name))

    def _iter_copies(self, name: str) -> Iterator[Copy]:
        # A generator so that locate() stops at the first hit.
        for datadir in self.datadirs:
            path = datadir.path_of(name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    continue  # longer than this datadir's names: not here
                # A failing disk must not hide the names of the others.
                log.error("datadir %s: cannot look up %r: %s", datadir.path, name, exc.strerror)
                continue
            if stat.S_ISREG(st.st_mode):
                yield Copy(datadir, path, st)

    def locate(self, name: str) -> Copy:
        """The copy that reads see, or ENOENT."""
        for copy in self._iter_copies(name):
            return copy
        raise _fail(errno.ENOENT, name)

    def exists(self, name: str) -> bool:
        return name in self._open_files or any(True for _ in self._iter_copies(name))

    def stat(self, name: str) -> os.stat_result:
        open_file = self._open_files.get(name)
        if open_file is not None:
            return os.fstat(open_file.any_fd())
        return self.locate(name).stat

    def list_names(
        self, each: Callable[[list[bytes], int], T]
    ) -> tuple[T, SimpleQueue[T | BaseException | None]]:
        """Each visible name once, encoded as on disk, handed to ``each`` in parts.

        ``each(names, part)`` is called for each datadir's names in lookup
        order, then for the files being written. Returns ``each`` of the
        first datadir's names, made on this thread, and a queue of the
        others, ended by None (or an exception): for a large listing they
        are made on a worker thread, so that the program reading it starts on
        its beginning while the rest is prepared. Large datadirs after the
        first are read side by side on workers. All are read before this
        returns, so that the listing is one snapshot of what the request lock
        protects (a file being moved shows in one datadir or the other).
        """
        paths = [datadir.path for datadir in self.datadirs]
        on_workers = {
            path: self._lister.submit(regular_files_or_error, path)
            for path in paths[1:]
            if is_large(path)
        }
        being_written = [os.fsencode(name) for name, f in self._open_files.items() if f.new]
        first_names = self._usable(paths[0], regular_files_or_error(paths[0]))
        first = each(first_names, 0)
        found = [
            on_workers[path].result() if path in on_workers else regular_files_or_error(path)
            for path in paths[1:]
        ]
        parts = self._other_parts(paths, first_names, found, being_written)
        rest: SimpleQueue[T | BaseException | None] = SimpleQueue()
        if sum(len(names) for names in found if isinstance(names, list)) < _NAMES_FOR_A_WORKER:
            _each_part(each, parts, rest)  # waking a worker would cost more
        else:
            self._lister.submit(_each_part, each, parts, rest)
        return first, rest

    @staticmethod
    def _usable(path: str, found: list[bytes] | OSError) -> list[bytes]:
        if isinstance(found, OSError):
            log.error("cannot list datadir %s: %s", path, found.strerror)
            return []
        return found

    def _other_parts(
        self,
        paths: list[str],
        first_names: list[bytes],
        found: list[list[bytes] | OSError],
        being_written: list[bytes],
    ) -> Iterator[list[bytes]]:
        """The names of the datadirs after the first, then of the files being
        written, each without the names of the datadirs before it."""
        seen = set(first_names) if found or being_written else set()
        for path, names in zip(paths[1:], found, strict=True):
            usable = self._usable(path, names)
            # A name in two datadirs (a copy being moved) is listed once.
            # Datadirs rarely share names, and a set answers that for all of
            # them at once: only then is a datadir's list filtered name by name.
            yield usable if seen.isdisjoint(usable) else [n for n in usable if n not in seen]
            seen.update(usable)
        yield [name for name in being_written if name not in seen]

    # -------------------------------------------------------------- placement

    def choose_datadir_for(
        self, name: str, needed_bytes: int = 0, exclude: frozenset[str] = frozenset()
    ) -> Datadir:
        """The datadir a new file goes to, or ENOSPC/EROFS with a log of what was tried."""
        healthy = []
        for datadir in self.datadirs:
            if datadir.retired or datadir.path in exclude:
                continue
            if datadir.assess() is State.OK:
                healthy.append(DatadirSpace(datadir.path, datadir.priority, datadir.free_bytes))
        chosen = choose_datadir(healthy, self.min_free_space, needed_bytes)
        if chosen is not None:
            return self._datadir_by_path[chosen.path]
        tried = ", ".join(
            f"{d.path} (priority {d.priority}, {d.free_bytes} bytes free, {d.state.value}"
            f"{', already tried' if d.path in exclude else ''})"
            for d in self.datadirs
        )
        log.warning(
            "no datadir can hold %r: each needs more than %d bytes free; tried %s",
            name,
            self.min_free_space + needed_bytes,
            tried,
        )
        if not healthy and any(d.state is State.READ_ONLY for d in self.datadirs):
            raise _fail(errno.EROFS, f"no writable datadir for {name!r}")
        raise _fail(errno.ENOSPC, f"no datadir can hold {name!r}")

    # ----------------------------------------------------------- open/create

    def create(self, name: str, mode: int, uid: int, gid: int, flags: int) -> Handle:
        """Create ``name`` as a new file under a hidden name in the best datadir.

        If the name exists (the kernel's negative cache can be stale when a
        file appeared directly in a datadir), ``O_EXCL`` gets EEXIST and
        otherwise the existing file is opened, as open(2) would.
        """
        self.check_new_name(name)
        if self.exists(name):
            if flags & os.O_EXCL:
                raise _fail(errno.EEXIST, name)
            return self.open(name, flags)
        datadir = self._free_datadir_for(name)
        start_private_area(datadir)
        path = datadir.private.new_incoming_path()
        fd = os.open(path, _NEW_FILE_FLAGS, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        log.debug("creating %r in %s as %s", name, datadir.path, path)
        open_file = OpenFile(name=name, datadir=datadir.path, path=path, new=True)
        self._open_files[name] = open_file
        return self._add_handle(open_file, fd, os.O_RDWR | _BACKING_FLAGS, writable=True)

    def _free_datadir_for(self, name: str) -> Datadir:
        """The best datadir where ``name`` is free to be published.

        A datadir may hold a directory, symlink or special file of that name,
        which the pool does not show: a new file written there could never
        be published, so it goes to the next best datadir.
        """
        occupied: set[str] = set()
        while True:
            try:
                datadir = self.choose_datadir_for(name, exclude=frozenset(occupied))
            except OSError:
                if occupied:
                    raise _fail(
                        errno.EEXIST,
                        f"{name!r} is taken by entries the pool does not show, in "
                        + ", ".join(sorted(occupied)),
                    ) from None
                raise
            if not os.path.lexists(datadir.path_of(name)):
                return datadir
            log.warning(
                "datadir %s holds a non-file entry %r that the pool ignores: "
                "the new file goes elsewhere (see 'fusestore check')",
                datadir.path,
                name,
            )
            occupied.add(datadir.path)

    def open(self, name: str, flags: int) -> Handle:
        """Open an existing file; ``O_TRUNC`` truncates it."""
        open_file = self._open_files.get(name)
        if open_file is None or open_file.path is None:
            copy = self.locate(name)
            open_file = OpenFile(name=name, datadir=copy.datadir.path, path=copy.path)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        # Writable handles read too: the kernel may read a page it is about to
        # write part of, even through a write-only descriptor.
        access = os.O_RDWR if writable else os.O_RDONLY
        backing_flags = (flags & ~_CALLER_ONLY_FLAGS) | access | _BACKING_FLAGS
        fd = os.open(open_file.path, backing_flags)  # type: ignore[arg-type]
        if flags & os.O_TRUNC and writable:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                raise
        self._open_files[name] = open_file
        return self._add_handle(open_file, fd, backing_flags, writable)

    @staticmethod
    def _add_handle(open_file: OpenFile, fd: int, flags: int, writable: bool) -> Handle:
        handle = Handle(open_file=open_file, fd=fd, flags=flags, writable=writable)
        open_file.handles.add(handle)
        return handle

    # ---------------------------------------------------------------- writing

    def start_write(self, handle: Handle, offset: int, data: bytes) -> Callable[[], int] | None:
        """The write as work that may run beside other writes, or ``None``.

        ``None`` when the write would change the pool (a file published early
        is taken back first). The work raises OSError on any failure, the pool
        untouched: :meth:`write` then does it again and handles it (a full
        datadir, an error to record).
        """
        if handle.published_early:
            return None
        open_file = handle.open_file

        def work() -> int:
            written = handle.write(offset, data)
            open_file.dirty = True
            return written

        return work

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        """Write all of ``data``, moving the file to another datadir if its own is full."""
        open_file = handle.open_file
        if handle.published_early:
            self._take_back(handle)
        tried: set[str] = set()
        while True:
            try:
                written = handle.write(offset, data)
                open_file.dirty = True
                return written
            except OSError as exc:
                if exc.errno not in _NO_ROOM:
                    self._note_write_error(open_file, exc)
                    raise
            tried.add(open_file.datadir)
            needed = max(os.fstat(handle.fd).st_size, offset + len(data))
            try:
                self._move_to_another_datadir(open_file, needed, tried)
            except OSError as exc:
                self._note_write_error(open_file, exc)
                raise

    def _move_to_another_datadir(self, open_file: OpenFile, needed: int, tried: set[str]) -> None:
        """Move the file to the best datadir not yet tried; ENOSPC when none can hold it."""
        name = open_file.name or "(unlinked file)"
        while True:
            target = self.choose_datadir_for(name, needed, exclude=frozenset(tried))
            try:
                self._move(open_file, target)
                return
            except OSError as exc:
                if exc.errno not in _NO_ROOM:
                    raise
                log.warning("datadir %s filled up while %r moved in", target.path, name)
                tried.add(target.path)

    def _move(self, open_file: OpenFile, target: Datadir) -> None:
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
        new_fd = os.open(new_path, _NEW_FILE_FLAGS, 0o600)
        try:
            st = os.fstat(source_fd)
            if os.geteuid() == 0:
                os.fchown(new_fd, st.st_uid, st.st_gid)
            os.fchmod(new_fd, stat.S_IMODE(st.st_mode))
            _copy_bytes(source_fd, new_fd, st.st_size)
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
            os.unlink(source_path)
        open_file.datadir = target.path
        log.warning(
            "moved %r (%d bytes) from full datadir %s to %s",
            open_file.name or "(unlinked file)",
            st.st_size,
            source_datadir,
            target.path,
        )

    @staticmethod
    def _note_write_error(open_file: OpenFile, exc: OSError) -> None:
        # EACCES is the caller's business: the file stays. Any other failure
        # of a new file means it is incomplete, and it is removed at close.
        if open_file.new and exc.errno != errno.EACCES:
            open_file.error = open_file.error or exc.errno
            log.error("write to new file %r failed: %s", open_file.name, exc)

    def flush(self, handle: Handle) -> None:
        """On close(): publish a new file if this is its only handle (or drop it if unlinked).

        Publishing here rather than at release means the file is in its
        datadir when close() returns, and close() can report what release
        cannot: a failed write (the file is removed), EEXIST (the name was
        taken meanwhile; the data is kept aside) and fsync errors. If
        descriptors stay open after this close and are written to — shells
        and dd open the file, dup2 it onto stdout and close the original
        before writing a byte; a forked child closes its copy at exec — the
        file goes back under its hidden name until the next close, so a crash
        does not leave it half-written under its name.
        """
        open_file = handle.open_file
        if open_file.new and open_file.handles == {handle}:
            unlinked = open_file.name is None
            self._finish_new_file(open_file)
            handle.published_early = not unlinked

    @staticmethod
    def _drop_hidden_name(open_file: OpenFile) -> None:
        """A new file unlinked while open loses its hidden name at its last close().

        That is flush, not release: release comes after close() has returned,
        and the file would stay in the private area a moment after the program
        is done with it. Descriptors that survive this close (dup'ed) keep the
        bytes until they close too, as on any disk.
        """
        assert open_file.path is not None
        os.unlink(open_file.path)
        open_file.path, open_file.new = None, False

    def fsync(self, handle: Handle, datasync: bool) -> None:
        """fsync; for a new file, also report EEXIST if its name was taken meanwhile."""
        handle.fsync(datasync)
        open_file = handle.open_file
        open_file.dirty = False
        if open_file.new and open_file.name is not None and self.copies(open_file.name):
            raise _fail(errno.EEXIST, f"{open_file.name!r} appeared in the pool meanwhile")

    def _take_back(self, handle: Handle) -> None:
        """A file published at an early close() is written again: hide it again."""
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
        hidden = self._datadir_by_path[open_file.datadir].private.new_incoming_path()
        os.rename(open_file.path, hidden)
        open_file.path, open_file.new = hidden, True
        log.debug(
            "%r is written again after an early close: hidden until the next one", open_file.name
        )

    def release(self, handle: Handle) -> None:
        """Close a handle; the last one publishes or discards a new file."""
        open_file = handle.open_file
        try:
            if open_file.new and open_file.handles == {handle}:
                self._finish_new_file(open_file)
        finally:
            open_file.handles.discard(handle)
            os.close(handle.fd)
            if not open_file.handles and open_file.name is not None:
                self._forget(open_file.name, open_file)

    def _finish_new_file(self, open_file: OpenFile) -> None:
        """Publish a new file under its name, or remove it, or keep it aside.

        Removed: it was unlinked while open, or a write (or the final fsync)
        failed, so it is incomplete. Kept aside in the private area: its name
        was taken meanwhile, or publishing failed, so the bytes are whole but
        have no name; nothing that was written completely is lost.
        """
        hidden, name = open_file.path, open_file.name
        assert hidden is not None
        if name is None:
            self._drop_hidden_name(open_file)
            return
        datadir = self._datadir_by_path[open_file.datadir]
        if open_file.error is None and self.sync and open_file.dirty:
            try:
                os.fsync(open_file.any_fd())
                open_file.dirty = False
            except OSError as exc:
                self._note_write_error(open_file, exc)
        open_file.new = False
        if open_file.error is not None:
            open_file.path = None
            # Free the space now: handles may outlive this close by a moment.
            os.truncate(hidden, 0)
            os.unlink(hidden)
            self._forget(name, open_file)
            log.warning("removed incomplete new file %r after a failed write", name)
            raise _fail(open_file.error or errno.EIO, f"{name!r} was not stored")
        final_path = datadir.path_of(name)
        try:
            if self.copies(name):
                raise FileExistsError(errno.EEXIST, "its name was taken meanwhile")
            os.link(hidden, final_path)  # unlike rename, never replaces
        except OSError as exc:
            self._keep_aside(open_file, datadir, name, str(exc))
            if isinstance(exc, FileExistsError):
                raise _fail(errno.EEXIST, f"{name!r} appeared in the pool meanwhile") from None
            raise
        open_file.path = final_path
        os.unlink(hidden)
        if self.sync:
            sync_directory(datadir.path)
        log.debug("published %r in %s", name, datadir.path)

    def _keep_aside(self, open_file: OpenFile, datadir: Datadir, name: str, reason: str) -> None:
        hidden = open_file.path
        assert hidden is not None
        try:
            kept = datadir.private.keep_aside(hidden, name)
        except OSError as exc:
            kept = hidden  # still safe from the leftover sweep while we run
            log.error("cannot move %s into the kept area: %s", hidden, exc.strerror)
        open_file.path, open_file.new = kept, False
        self._forget(name, open_file)
        open_file.name = None
        log.error("%r could not be published (%s): its data is kept in %s", name, reason, kept)

    def _forget(self, name: str, open_file: OpenFile) -> None:
        if self._open_files.get(name) is open_file:
            del self._open_files[name]

    # ---------------------------------------------------------------- changes

    def set_attributes(
        self,
        name: str,
        handle: Handle | None = None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> os.stat_result:
        """chmod/chown/truncate/utimens on the copy that reads see."""
        target: int | str
        open_file = handle.open_file if handle is not None else self._open_files.get(name)
        if open_file is not None and open_file.path is None:
            # Unlinked while open: only a descriptor reaches it.
            writable = [h for h in open_file.handles if h.writable]
            target = (writable or list(open_file.handles))[0].fd
        elif open_file is not None:
            target = open_file.path  # type: ignore[assignment]
        else:
            target = self.locate(name).path
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(target, stat.S_IMODE(mode))
        if size is not None:
            os.truncate(target, size)
        if atime_ns is not None or mtime_ns is not None:
            current = os.stat(target)
            os.utime(
                target,
                ns=(
                    current.st_atime_ns if atime_ns is None else atime_ns,
                    current.st_mtime_ns if mtime_ns is None else mtime_ns,
                ),
            )
        return os.stat(target)

    def unlink(self, name: str) -> None:
        """Remove every copy, so a deleted file never returns from a lower datadir."""
        copies = self.copies(name)
        open_file = self._open_files.get(name)
        if not copies and not (open_file is not None and open_file.new):
            raise _fail(errno.ENOENT, name)
        first_error: OSError | None = None
        for copy in copies:
            try:
                os.unlink(copy.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove %s: %s", copy.path, exc.strerror)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        self._detach(name)

    def rename(self, old: str, new: str, no_replace: bool = False) -> None:
        """Rename every copy of ``old`` in place, then remove ``new`` from the other datadirs.

        The file never changes datadir, so a rename is as cheap and atomic as
        on the disk; copies of ``new`` in datadirs that had no ``old`` would
        otherwise shadow or resurrect the old target, so they go. A new file
        that is still being written is simply published under the new name.
        """
        self.check_new_name(new)
        moving = self._open_files.get(old)
        being_written = moving is not None and moving.new
        sources = [] if being_written else self.copies(old)
        if not sources and not being_written:
            raise _fail(errno.ENOENT, old)
        targets = self.copies(new)
        target_open = self._open_files.get(new)
        if no_replace and (targets or (target_open is not None and target_open.new)):
            raise _fail(errno.EEXIST, new)
        if old == new:
            return
        renamed_in: set[str] = set()
        for position, source in enumerate(sources):
            try:
                os.rename(source.path, source.datadir.path_of(new))
            except OSError as exc:
                if position == 0:
                    raise  # nothing has changed yet
                log.error("cannot rename shadowed copy %s: %s", source.path, exc.strerror)
                continue
            renamed_in.add(source.datadir.path)
        for target in targets:
            if target.datadir.path not in renamed_in:
                try:
                    os.unlink(target.path)
                except OSError as exc:
                    log.error("cannot remove replaced copy %s: %s", target.path, exc.strerror)
        self._detach(new)
        if moving is not None:
            del self._open_files[old]
            moving.name = new
            if not moving.new and moving.path is not None:
                moving.path = os.path.join(moving.datadir, new)
            self._open_files[new] = moving

    def _detach(self, name: str) -> None:
        open_file = self._open_files.pop(name, None)
        if open_file is not None:
            open_file.detach()

    # ------------------------------------------------------------------ space

    def space(self) -> PoolSpace:
        """Sum the datadirs' filesystems, each filesystem once."""
        block_size = 4096
        total = free = available = inodes = free_inodes = 0
        name_max = 255
        seen: set[int] = set()
        for datadir in self.datadirs:
            try:
                device = os.stat(datadir.path).st_dev
                vfs = os.statvfs(datadir.path)
            except OSError as exc:
                log.error("cannot measure datadir %s: %s", datadir.path, exc.strerror)
                continue
            if device in seen:
                continue
            seen.add(device)
            total += vfs.f_blocks * vfs.f_frsize
            free += vfs.f_bfree * vfs.f_frsize
            available += vfs.f_bavail * vfs.f_frsize
            inodes += vfs.f_files
            free_inodes += vfs.f_ffree
            name_max = min(name_max, vfs.f_namemax)
        return PoolSpace(
            block_size=block_size,
            total_blocks=total // block_size,
            free_blocks=free // block_size,
            available_blocks=available // block_size,
            total_inodes=inodes,
            free_inodes=free_inodes,
            name_max=name_max,
        )
