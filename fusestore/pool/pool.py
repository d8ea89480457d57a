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

Writing (README, "How it behaves": *Crash-safe publication*, *Spill-over*,
*Failing datadirs*): a new file is written under a hidden name in its
datadir's private area and published under its name when its last handle
closes (``publish.py``). A write that finds its datadir full, or failing
(EIO), moves the file, bytes and handles, to the best other datadir and goes
on there (``spillover.py``). A listing is one
snapshot of every datadir (``snapshot.py``); ``statfs`` adds up their
filesystems (``space.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TypeVar

from fusestore.pool import attributes, checksums, memory, publish, snapshot, space, sparse
from fusestore.pool.checksummer import Checksummer
from fusestore.pool.closer import Closer
from fusestore.pool.config import PoolConfig
from fusestore.pool.datadirs import (
    Datadir,
    State,
    is_disk_error,
    mark_and_sweep,
    note_failure,
    open_datadirs,
    start_private_area,
)
from fusestore.pool.errors import expected_failure, failure
from fusestore.pool.health import HealthWatch, catch_up
from fusestore.pool.listing import DatadirLister
from fusestore.pool.openfiles import BACKING_FLAGS, NEW_FILE_FLAGS, Handle, OpenFile
from fusestore.pool.placement import DatadirSpace, choose_datadir, lookup_order
from fusestore.pool.private import PRIVATE_DIR
from fusestore.pool.space import PoolSpace
from fusestore.pool.spillover import (
    NO_ROOM,
    copy_range,
    move_open_file,
    move_to_another_datadir,
)

log = logging.getLogger(__name__)

# Seconds stop() waits for the datadirs to let go of the daemon's private areas.
_STOP_WAIT = 2.0

T = TypeVar("T")

# Flags that describe how the *caller* opened the file and must not reach the
# backing descriptor: creation and truncation are done by the pool itself;
# O_APPEND is left to the kernel, which sends the right offset with each write;
# O_DIRECT is not supported by every backing filesystem (tmpfs refuses it).
_CALLER_ONLY_FLAGS = (
    os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY | os.O_DIRECT | os.O_ACCMODE
)


# Errors of a change that was refused, not half done: a new file stays whole.
_NOT_DONE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class Copy:
    """A regular file of a given name in one datadir."""

    datadir: Datadir
    path: str
    stat: os.stat_result


def _set_times(
    target: int | str, current: os.stat_result, atime_ns: int | None, mtime_ns: int | None
) -> None:
    """utimensat of the times given; the other keeps its ``current`` value."""
    if atime_ns is None and mtime_ns is None:
        return
    os.utime(
        target,
        ns=(
            current.st_atime_ns if atime_ns is None else atime_ns,
            current.st_mtime_ns if mtime_ns is None else mtime_ns,
        ),
    )


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
        self.algorithms = config.checksums
        self.thin = config.thin_provisioning
        self.passthrough_headroom = config.passthrough_headroom
        # Closes backing files outside the daemon (``closer.py``).
        self.closer = Closer()
        self.checksummer = Checksummer(
            hung=self._in_hung_datadir,
            read_failed=self._checksum_read_failed,
            close=self.closer.close,
        )
        self._open_files: dict[str, OpenFile] = {}
        # Descriptors released while their datadir hung, by datadir path.
        self._close_when_back: dict[str, list[int]] = {}
        self._lister = DatadirLister()
        self.name_max = space.name_limit([datadir.path for datadir in self.datadirs])
        self.health = HealthWatch(
            lambda: self.datadirs, config.datadir_timeout, self._datadir_hung, self._datadir_back
        )

    def start(self) -> None:
        """Mark the datadirs, sweep the leftovers of writers that crashed, start
        checksumming and watching the datadirs' health."""
        memory.limit_arenas()  # before any thread allocates
        self.closer.start()  # first: while the daemon still has one thread
        mark_and_sweep(self.datadirs)
        self.checksummer.start()
        self.health.start()

    def reconfigure(self, config: PoolConfig) -> None:
        """Apply a reloaded config at once, or raise ConfigError and change nothing.

        New datadirs join (marked, swept); priorities and the reserve change;
        a datadir dropped from the config takes no new files, but its files
        stay visible and usable until they are moved off.
        """
        added = open_datadirs(config.datadirs, self.instance, existing=self.datadirs)
        priorities = {spec.path: spec.priority for spec in config.datadirs}
        for datadir in self.datadirs:
            datadir.draining = False  # a drain's "no new files" lasts until a reload
            retired = datadir.path not in priorities
            if retired and not datadir.retired:
                log.warning("datadir %s was removed from the config: no new files", datadir.path)
            datadir.retired = retired
            datadir.priority = priorities.get(datadir.path, datadir.priority)
        for datadir in added:
            log.info("datadir %s (priority %d) joins the pool", datadir.path, datadir.priority)
        # In the config's order, so that datadirs of one priority are looked
        # up (and tie) as given; retired ones after them.
        by_path = {datadir.path: datadir for datadir in [*self.datadirs, *added]}
        in_config = [by_path[spec.path] for spec in config.datadirs]
        retired = [datadir for datadir in self.datadirs if datadir.retired]
        self.datadirs = lookup_order([*in_config, *retired])
        self._datadir_by_path = {datadir.path: datadir for datadir in self.datadirs}
        self.min_free_space = config.min_free_space
        self.sync = config.sync
        self.algorithms = config.checksums
        self.thin = config.thin_provisioning
        self.passthrough_headroom = config.passthrough_headroom
        self.name_max = space.name_limit([datadir.path for datadir in self.datadirs])
        self.health.timeout = config.datadir_timeout
        mark_and_sweep(self.datadirs)

    def stop(self) -> None:
        """Stop the pool's threads and leave the private areas.

        A datadir that does not answer within ``_STOP_WAIT`` (hung, or
        about to be found hung) is left as it is: its incoming directory
        stays, swept at the next start, and the closer process stays to
        close its files once the daemon is gone (``closer.py``).
        """
        self.health.stop()
        self.checksummer.stop()
        self._lister.stop()
        leaving = [
            threading.Thread(target=datadir.private.stop, args=(self.closer.close,), daemon=True)
            for datadir in self.datadirs
            if not datadir.hung
        ]
        for thread in leaving:
            thread.start()
        deadline = time.monotonic() + _STOP_WAIT
        for thread in leaving:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = len(self.datadirs) - sum(not thread.is_alive() for thread in leaving)
        if left:
            log.warning("%d datadir(s) did not answer: their private areas are left", left)
        else:
            self.closer.stop()

    def _datadir_hung(self, datadir: Datadir) -> None:
        """A datadir stopped answering (``health.py``): say what that means."""
        log.error(
            "while datadir %s hangs, listings leave its files out, new files go elsewhere "
            "and its names answer EIO",
            datadir.path,
        )

    def _datadir_back(self, datadir: Datadir) -> None:
        """A hung datadir answers again: in a thread of its own (it may hang
        again), close what was released meanwhile and catch up on what could
        not be checked (``health.catch_up``)."""
        released = self._close_when_back.pop(datadir.path, [])
        others = [d for d in self.datadirs if d is not datadir and not d.hung]

        def catch_up_now() -> None:
            for fd in released:
                self.closer.close(fd)
            catch_up(datadir, others)

        threading.Thread(target=catch_up_now, name=f"catch up {datadir.path}", daemon=True).start()

    def check_new_name(self, name: str) -> None:
        """Refuse a name the pool could not publish: before any byte is written."""
        if name == PRIVATE_DIR:
            raise failure(errno.EPERM, f"{name!r} is reserved for fusestore's private area")
        if len(name) * 4 <= self.name_max:
            return  # even four bytes a character fits: spare the encoding
        length = len(os.fsencode(name))
        if length > self.name_max:
            raise failure(
                errno.ENAMETOOLONG,
                f"a name of {length} bytes; the datadirs hold at most {self.name_max}",
            )

    # ------------------------------------------------------------------- root

    def _reachable_datadirs(self) -> Iterator[tuple[Datadir, os.stat_result]]:
        for datadir in self.datadirs:
            if datadir.hung:
                continue
            try:
                yield datadir, os.stat(datadir.path)
            except OSError:
                continue  # vanished: placement says so; the rest of the pool goes on

    def root_stat(self) -> os.stat_result:
        """The attributes the pool's root shows: the top-priority datadir's (its
        owner and mode decide who may create files), or the next one's while
        it cannot be reached, so that one missing disk does not hide the pool."""
        for _, st in self._reachable_datadirs():
            return st
        raise failure(errno.EIO, "no datadir can be reached")

    def set_root_attributes(
        self,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """chmod/chown of the root apply to every datadir, so that the
        permission the kernel checks on the root is what every datadir
        enforces; times are the top reachable datadir's."""
        reachable = list(self._reachable_datadirs())
        if not reachable:
            raise failure(errno.EIO, "no datadir can be reached")
        for datadir, _ in reachable:
            if uid is not None or gid is not None:
                os.chown(datadir.path, -1 if uid is None else uid, -1 if gid is None else gid)
            if mode is not None:
                os.chmod(datadir.path, stat.S_IMODE(mode))
        (top, current), *_ = reachable
        _set_times(top.path, current, atime_ns, mtime_ns)

    # ----------------------------------------------------------------- lookup

    def copies(self, name: str) -> list[Copy]:
        """Every regular file called ``name``, winner first."""
        return list(self._iter_copies(name))

    def _iter_copies(self, name: str, foreign: set[str] | None = None) -> Iterator[Copy]:
        """The regular files called ``name``, winner first; the datadirs that hold
        something else of that name are added to ``foreign``, if given.

        A generator so that locate() stops at the first hit. Hung datadirs
        are not asked (see :meth:`refuse_if_hung_may_hold`).
        """
        for datadir in self.datadirs:
            if datadir.hung:
                continue
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
            elif foreign is not None:
                foreign.add(datadir.path)

    def locate(self, name: str) -> Copy:
        """The copy that reads see, or ENOENT."""
        for copy in self._iter_copies(name):
            return copy
        self.refuse_if_hung_may_hold(name)
        raise failure(errno.ENOENT, name)

    def refuse_if_hung_may_hold(self, name: str) -> None:
        """EIO if a hung datadir may hold ``name`` (its name index says so).

        The pool cannot answer for such a name: not ENOENT (the file may be
        there), not a new file of that name (it would be a second copy), not
        an unlink or rename (the copy there would come back with the datadir).
        """
        for datadir in self.datadirs:
            if datadir.hung and datadir.names.may_hold(name):
                raise expected_failure(
                    errno.EIO, f"{name!r} may be in datadir {datadir.path}, which is hung"
                )

    def _datadir_of(self, path: str) -> Datadir | None:
        """The datadir holding the file at ``path`` (the deepest, should one
        datadir lie inside another), if any."""
        holders = [d for d in self.datadirs if path.startswith(d.path + "/")]
        return max(holders, key=lambda d: len(d.path), default=None)

    def _in_hung_datadir(self, path: str) -> bool:
        datadir = self._datadir_of(path)
        return datadir is not None and datadir.hung

    def _refuse_if_hung(self, open_file: OpenFile) -> None:
        """EIO for a request on a file open in a hung datadir: asking would wait with it."""
        datadir = self._datadir_by_path.get(open_file.datadir)
        if datadir is not None and datadir.hung:
            raise expected_failure(
                errno.EIO, f"{open_file.name!r} is in datadir {datadir.path}, which is hung"
            )

    def stat(self, name: str) -> os.stat_result:
        open_file = self._open_files.get(name)
        if open_file is not None:
            self._refuse_if_hung(open_file)
        if open_file is not None and (open_file.new or open_file.path is None):
            return os.fstat(open_file.any_fd())
        if open_file is not None:
            # Its path, not a handle: a file moved while open for reading
            # (drain, balance) is the target's now; handles hold the source.
            return os.stat(open_file.path, follow_symlinks=False)
        return self.locate(name).stat

    def list_names(
        self, each: Callable[[list[bytes], int], T]
    ) -> tuple[T, SimpleQueue[T | BaseException | None]]:
        """Each visible name once, as one snapshot, handed to ``each`` in parts
        (see :func:`fusestore.pool.snapshot.list_names`); the files being
        written come last."""
        being_written = [os.fsencode(name) for name, f in self._open_files.items() if f.new]
        # A hung datadir's names are left out (its hang was logged with that).
        paths = [datadir.path for datadir in self.datadirs if not datadir.hung]
        if not paths:
            raise failure(errno.EIO, "every datadir is hung")
        return snapshot.list_names(paths, being_written, self._lister, each)

    # -------------------------------------------------------------- placement

    def choose_datadir_for(
        self, name: str, needed_bytes: int = 0, exclude: frozenset[str] = frozenset()
    ) -> Datadir:
        """The datadir a new file goes to, or ENOSPC/EROFS with a log of what was tried."""
        candidates = self._candidates(exclude)
        chosen = self._place(candidates, needed_bytes)
        if chosen is not None:
            return chosen
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
        if not candidates and any(d.state is State.READ_ONLY for d in self.datadirs):
            raise failure(errno.EROFS, f"no writable datadir for {name!r}")
        raise failure(errno.ENOSPC, f"no datadir can hold {name!r}")

    def best_datadir(
        self, needed_bytes: int = 0, exclude: frozenset[str] = frozenset()
    ) -> Datadir | None:
        """Placement (``placement.py``) over the datadirs that take files now, or None."""
        return self._place(self._candidates(exclude), needed_bytes)

    def _candidates(self, exclude: frozenset[str]) -> list[Datadir]:
        return [d for d in self.datadirs if d.path not in exclude and d.takes_new_files()]

    def _place(self, candidates: list[Datadir], needed_bytes: int) -> Datadir | None:
        spaces = [DatadirSpace(d.path, d.priority, d.free_bytes) for d in candidates]
        chosen = choose_datadir(spaces, self.min_free_space, needed_bytes)
        return None if chosen is None else self._datadir_by_path[chosen.path]

    # ----------------------------------------------------------- open/create

    def create(self, name: str, mode: int, uid: int, gid: int, flags: int) -> Handle:
        """Create ``name`` as a new file under a hidden name in the best datadir.

        If the name exists (the kernel's negative cache can be stale when a
        file appeared directly in a datadir), ``O_EXCL`` gets EEXIST and
        otherwise the existing file is opened, as open(2) would.
        """
        self.check_new_name(name)
        foreign: set[str] = set()
        if name in self._open_files or any(True for _ in self._iter_copies(name, foreign)):
            if flags & os.O_EXCL:
                raise failure(errno.EEXIST, name)
            return self.open(name, flags)
        self.refuse_if_hung_may_hold(name)
        datadir = self._free_datadir_for(name, frozenset(foreign))
        start_private_area(datadir)
        path = datadir.private.new_incoming_path()
        fd = os.open(path, NEW_FILE_FLAGS, 0o600)
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
        return self._add_handle(open_file, fd, os.O_RDWR | BACKING_FLAGS, writable=True)

    def _free_datadir_for(self, name: str, foreign: frozenset[str]) -> Datadir:
        """The best datadir where ``name`` is free to be published.

        ``foreign``: the datadirs that hold a directory, symlink or special
        file of that name, which the pool does not show. A new file written
        there could never be published, so it goes to the next best datadir.
        """
        for path in sorted(foreign):
            log.warning(
                "datadir %s holds a non-file entry %r that the pool ignores: "
                "new files of that name go elsewhere (see 'fusestore check')",
                path,
                name,
            )
        try:
            return self.choose_datadir_for(name, exclude=foreign)
        except OSError:
            if not foreign:
                raise
            raise failure(
                errno.EEXIST,
                f"{name!r} is taken by entries the pool does not show, in "
                + ", ".join(sorted(foreign)),
            ) from None

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
        backing_flags = (flags & ~_CALLER_ONLY_FLAGS) | access | BACKING_FLAGS
        fd = os.open(open_file.path, backing_flags)  # type: ignore[arg-type]
        if writable and not open_file.new:
            self._will_change(open_file.path, fd)  # type: ignore[arg-type]
        if flags & os.O_TRUNC and writable:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                raise
        self._open_files[name] = open_file
        return self._add_handle(open_file, fd, backing_flags, writable)

    def writes_pass_through(self, handle: Handle) -> bool:
        """Whether the kernel may write this handle's file straight to its
        backing file (FUSE passthrough), the pool never seeing the writes.

        A file, new or existing, not setuid or setgid (the kernel writes as
        the daemon, which would keep those bits), in a healthy datadir with
        more than ``passthrough_headroom`` free above the reserve: a write
        that fills it gets ENOSPC, no spill-over, and a new file that
        announces its size is not placed by it. A new one is still published
        at its last close (``flush``), fsynced first, and removed instead if
        its datadir ran out of room (``publish.finish_new_file``).
        """
        open_file = handle.open_file
        if not (handle.writable and self.passthrough_headroom):
            return False
        datadir = self._datadir_by_path.get(open_file.datadir)
        if datadir is None:
            return False
        # A new file's datadir was measured by placement in this very request.
        state = datadir.state if open_file.new else datadir.assess()
        if state is not State.OK:
            return False
        if datadir.free_bytes - self.min_free_space <= self.passthrough_headroom:
            return False
        return not os.fstat(handle.fd).st_mode & (stat.S_ISUID | stat.S_ISGID)

    @staticmethod
    def _add_handle(open_file: OpenFile, fd: int, flags: int, writable: bool) -> Handle:
        handle = Handle(open_file=open_file, fd=fd, flags=flags, writable=writable)
        open_file.handles.add(handle)
        return handle

    # ---------------------------------------------------------------- reading

    def read(self, handle: Handle, offset: int, size: int) -> bytes:
        """A read the daemon answers (not one the kernel does in passthrough);
        a failed one is logged once per file and counted in its datadir."""
        try:
            return handle.read(offset, size)
        except OSError as exc:
            self._failed(handle.open_file, "read", exc)
            raise

    def _failed(self, open_file: OpenFile, kind: str, exc: OSError) -> bool:
        """``note_failure`` in the file's datadir: whether the disk failed."""
        return note_failure(self._datadir_by_path.get(open_file.datadir), open_file, kind, exc)

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
        self._refuse_if_hung(open_file)

        def work() -> int:
            written = self._put(handle, offset, data)
            open_file.dirty = True
            return written

        return work

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        """Write all of ``data``, moving the file to another datadir if its own is full."""
        self._refuse_if_hung(handle.open_file)
        if handle.published_early:
            self._take_back(handle)
        return self._until_it_fits(
            handle, offset + len(data), lambda: self._put(handle, offset, data)
        )

    def _put(self, handle: Handle, offset: int, data: bytes | memoryview) -> int:
        """The bytes into the backing file: zero blocks of a new file as holes
        with thin provisioning (``sparse.py``)."""
        if self.thin and handle.open_file.new:
            return sparse.write_thin(handle.fd, offset, memoryview(data))
        return handle.write(offset, data)

    def _until_it_fits(
        self, handle: Handle, end: int, change: Callable[[], T], own: bool = True
    ) -> T:
        """Make a change that needs space, moving the file to another datadir
        whenever its own is full (*Spill-over*); ``end``: the size it needs.

        A disk error (EIO) makes the datadir failing; a new file then moves
        to another datadir, bytes so far and handles, as a full one would,
        unless they cannot be read back: then bytes were lost, and the change
        fails. ``own``: the change reads nothing but the file (a copy from
        another file may fail in that one's disk: then nothing is told).
        """
        open_file = handle.open_file
        tried: set[str] = set()
        while True:
            try:
                result = change()
                open_file.dirty = True
                return result
            except OSError as exc:
                failed = exc
            if failed.errno in NO_ROOM and open_file.in_passthrough:
                # Moved, the file would leave the kernel writing to the old
                # backing file: the ENOSPC stands (README *Spill-over*).
                raise failed
            if failed.errno in NO_ROOM:
                why = "full"
            elif own and self._failed(open_file, "write", failed):
                if not open_file.new or open_file.error is not None:
                    open_file.note_write_error(failed)
                    raise failed
                why = "failing"
            else:
                if failed.errno not in _NOT_DONE:
                    open_file.note_write_error(failed)
                raise failed
            tried.add(open_file.datadir)
            try:
                needed = max(os.fstat(handle.fd).st_size, end)
                move_to_another_datadir(open_file, needed, tried, self.choose_datadir_for, why)
            except OSError as exc:
                if why == "full":
                    open_file.note_write_error(exc)
                    raise
                log.error(
                    "cannot move %r off failing datadir %s: %s; its write fails",
                    open_file.name or "(unlinked file)",
                    open_file.datadir,
                    exc.strerror or exc,
                )
                open_file.note_write_error(failed)
                raise failed from exc

    # ---------------------------------------------------------- sparse files

    def seek(self, handle: Handle, offset: int, whence: int) -> int:
        """lseek(SEEK_DATA/SEEK_HOLE) of the backing file (ENXIO past the data)."""
        self._refuse_if_hung(handle.open_file)
        return os.lseek(handle.fd, offset, whence)

    def allocate(self, handle: Handle, offset: int, length: int, mode: int) -> None:
        """fallocate on the backing file. A new, still empty file is first
        placed by the size this announces; one whose datadir cannot hold the
        space moves, as a write would."""
        if handle.published_early:
            self._take_back(handle)
        if not sparse.allocates(mode):
            try:
                sparse.fallocate(handle.fd, mode, offset, length)
            except OSError as exc:
                self._failed(handle.open_file, "write", exc)
                raise
            return
        self._place_by_size(handle.open_file, offset + length)
        self._until_it_fits(
            handle, offset + length, lambda: sparse.fallocate(handle.fd, mode, offset, length)
        )

    def copy_range(
        self, source: Handle, source_offset: int, target: Handle, target_offset: int, length: int
    ) -> int:
        """copy_file_range between two pool files, in the kernel (a reflink
        where the datadir can); the bytes copied."""
        if target.published_early:
            self._take_back(target)
        # cp asks for "everything" (a length near 2**63): the source says how much.
        length = max(0, min(length, os.fstat(source.fd).st_size - source_offset))
        if target_offset == 0:
            self._place_by_size(target.open_file, length)

        return self._until_it_fits(
            target,
            target_offset + length,
            lambda: copy_range(source.fd, target.fd, length, source_offset, target_offset),
            own=False,
        )

    def _place_by_size(self, open_file: OpenFile, size: int) -> None:
        """A new file nothing was written to yet announced its size (fallocate,
        ftruncate up, a copy into it): move it, cheaply, to the datadir
        placement picks for that size, so that no spill-over is needed later."""
        if not open_file.new or open_file.name is None or size <= 0 or open_file.in_passthrough:
            return  # in passthrough: the kernel would go on writing the old backing file
        st = os.fstat(open_file.any_fd())
        if st.st_size or st.st_blocks:
            return
        # Quietly: the size of a sparse image (qemu-img create) may fit
        # nowhere, and need not; a preallocation that fits nowhere fails and
        # says so itself.
        best = self.best_datadir(needed_bytes=size)
        if best is None or best.path == open_file.datadir:
            return
        try:
            move_open_file(open_file, best, log_move=False)
        except OSError as exc:  # a hint: the call goes on where the file is
            log.warning("cannot place %r by its size in %s: %s", open_file.name, best.path, exc)
            return
        log.info(
            "placed new file %r in %s by its announced size (%d bytes)",
            open_file.name,
            best.path,
            size,
        )

    def _take_back(self, handle: Handle) -> None:
        """A file published at an early close() is changed again (``publish.take_back``)."""
        open_file = handle.open_file
        if open_file.path is not None and not open_file.new:
            self._will_change(open_file.path, handle.fd)
        publish.take_back(handle, self._datadir_by_path[open_file.datadir])

    def flush(self, handle: Handle, still_open: bool = False) -> None:
        """On close(): publish a new file if this is its only handle (or drop it if unlinked).

        Publishing here rather than at release means the file is in its
        datadir when close() returns, and close() can report what release
        cannot: a failed write (the file is removed), EEXIST (the name was
        taken meanwhile; the data is kept aside) and fsync errors. If
        descriptors stay open after this close and are written to — shells
        and dd open the file, dup2 it onto stdout and close the original
        before writing a byte; a forked child closes its copy at exec — the
        file goes back under its hidden name until the next close, so a crash
        does not leave it half-written under its name. A file the kernel
        writes through passthrough cannot be taken back (no write comes
        here): ``still_open`` says that descriptors of it remain, found by
        the FUSE side (``fusestore/fuse/holders.py``), and it waits for a
        later close.
        """
        open_file = handle.open_file
        self._refuse_if_hung(open_file)
        if open_file.new and open_file.handles == {handle}:
            if still_open:
                log.debug("%r stays hidden at this close: descriptors of it remain", open_file.name)
                return
            unlinked = open_file.name is None
            self._finish_new_file(open_file)
            handle.published_early = not unlinked
        elif (
            handle.writable
            and not open_file.new
            and open_file.path is not None
            and not open_file.has_writer(besides=handle)
        ):
            self._checksum_later(open_file.datadir, open_file.path)

    def fsync(self, handle: Handle, datasync: bool) -> None:
        """fsync; for a new file, also report EEXIST if its name was taken meanwhile."""
        self._refuse_if_hung(handle.open_file)
        open_file = handle.open_file
        try:
            handle.fsync(datasync)
        except OSError as exc:
            # Bytes may be lost: a new file is not published (the next
            # fsync would not report the loss again).
            if self._failed(open_file, "write", exc):
                open_file.note_write_error(exc)
            raise
        open_file.dirty = False
        if open_file.new and open_file.name is not None and self.copies(open_file.name):
            raise failure(errno.EEXIST, f"{open_file.name!r} appeared in the pool meanwhile")

    def release(self, handle: Handle) -> None:
        """Close a handle; the last one publishes or discards a new file.

        In a hung datadir nothing is published (close() already got EIO from
        flush) and the descriptor stays open until the datadir answers again:
        closing a file makes its filesystem flush it, and the kernel waits for
        that flush without letting even an exiting thread go (a FUSE datadir).
        """
        open_file = handle.open_file
        hung = self._datadir_by_path[open_file.datadir].hung
        try:
            if open_file.new and open_file.handles == {handle} and not hung:
                self._finish_new_file(open_file)
        finally:
            open_file.handles.discard(handle)
            if hung:
                self._close_when_back.setdefault(open_file.datadir, []).append(handle.fd)
            else:
                self.closer.close(handle.fd)
            if not open_file.handles and open_file.name is not None:
                self._forget(open_file.name, open_file)

    def _finish_new_file(self, open_file: OpenFile) -> None:
        """Publish, remove or keep aside a new file (:mod:`fusestore.pool.publish`);
        one that did not take its name leaves the table of open files."""
        name = open_file.name
        try:
            publish.finish_new_file(
                open_file,
                self._datadir_by_path[open_file.datadir],
                lambda taken: bool(self.copies(taken)),
                self.sync,
            )
        except OSError:
            if name is not None and (open_file.name is None or open_file.path is None):
                self._forget(name, open_file)
            raise
        if open_file.name is not None and open_file.path is not None:
            self._datadir_by_path[open_file.datadir].names.add(open_file.name)
            self._checksum_later(open_file.datadir, open_file.path, open_file.any_fd())

    # -------------------------------------------------------------- checksums

    def _checksum_later(self, datadir: str, path: str, new_fd: int | None = None) -> None:
        """Have the file's checksums computed in the background (``checksummer.py``);
        a small file just published (``new_fd``, one of its descriptors) at once."""
        if not (self.algorithms and self._datadir_by_path[datadir].xattrs):
            return
        if new_fd is not None:
            try:
                if checksums.store_now(
                    new_fd, self.algorithms, new_file=True, largest=checksums.AT_ONCE
                ):
                    return
            except OSError as exc:
                log.error("cannot store the checksums of %s: %s", path, exc.strerror)
                return
        self.checksummer.add(path, self.algorithms, new_file=new_fd is not None)

    def _checksum_read_failed(self, path: str, exc: OSError) -> None:
        """The checksummer could not read a file: counted in its datadir."""
        log.error(
            "cannot read %s to checksum it: %s; it is left without checksums",
            path,
            exc.strerror or exc,
        )
        datadir = self._datadir_of(path)
        if datadir is not None and is_disk_error(exc):
            datadir.count_read_error()

    def _will_change(self, path: str, target: int | str) -> None:
        """The file's bytes are about to change through the pool: a job reading
        it stores nothing, and its stored checksums go."""
        self.checksummer.cancel(path)
        try:
            checksums.drop(target)
        except OSError as exc:
            # Its stamp still tells that the record is stale once it changes.
            log.error("cannot drop the checksums of %s: %s", path, exc.strerror)

    def checksums_due(self, name: str, attribute: str) -> threading.Event | None:
        """What to wait on (outside the request lock) before answering ``attribute``
        of ``name``: set once the checksums being computed are stored."""
        if attributes.checksum_algorithm(attribute) is None and attribute != checksums.VERIFIED:
            return None
        open_file = self._open_files.get(name)
        if open_file is not None and open_file.new:
            return None  # not published: no checksums yet
        path = open_file.path if open_file is not None else self._path_or_none(name)
        return None if path is None else self.checksummer.pending(path)

    def checksums_pending(self) -> int:
        """Files waiting for their checksums."""
        return self.checksummer.backlog()

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
        """chmod/chown/truncate/utimens on the copy that reads see.

        A truncation drops the file's checksums and has them computed again
        once no handle writes to it; a change of times alone keeps them.
        """
        open_file = handle.open_file if handle is not None else self._open_files.get(name)
        if size is not None and open_file is not None:
            self._place_by_size(open_file, size)
        target, datadir, open_file = self._target(name, handle)
        path = target if isinstance(target, str) else None
        published = path is not None and (open_file is None or not open_file.new)
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(target, stat.S_IMODE(mode))
        if size is not None:
            if published:
                self._will_change(path, target)  # type: ignore[arg-type]
            os.truncate(target, size)
            if published and not (open_file and open_file.has_writer()):
                self._checksum_later(datadir, path)  # type: ignore[arg-type]
        if atime_ns is not None or mtime_ns is not None:
            before = os.stat(target)
            _set_times(target, before, atime_ns, mtime_ns)
            if published and size is None:
                try:
                    checksums.restamp(target, before, os.stat(target))
                except OSError as exc:
                    log.error("cannot keep the checksums of %s: %s", path, exc.strerror)
        return os.stat(target)

    def _target(self, name: str, handle: Handle | None) -> tuple[int | str, str, OpenFile | None]:
        """What reaches the file that reads see — its path, or a descriptor when it
        was unlinked while open — with its datadir and its open file, if any."""
        open_file = handle.open_file if handle is not None else self._open_files.get(name)
        if open_file is not None:
            self._refuse_if_hung(open_file)
        if open_file is not None and open_file.path is None:
            writable = [h for h in open_file.handles if h.writable]
            return (writable or list(open_file.handles))[0].fd, open_file.datadir, open_file
        if open_file is not None:
            return open_file.path, open_file.datadir, open_file  # type: ignore[return-value]
        copy = self.locate(name)
        return copy.path, copy.datadir.path, None

    def _path_or_none(self, name: str) -> str | None:
        for copy in self._iter_copies(name):
            return copy.path
        return None

    # ---------------------------------------------------- extended attributes

    def get_attribute(self, name: str, attribute: str, handle: Handle | None = None) -> bytes:
        """An extended attribute (``attributes.py``): the user's, or the pool's own."""
        target, datadir, _ = self._target(name, handle)
        if attributes.is_own(attribute):
            path = target if isinstance(target, str) else None
            return attributes.own_value(attribute, target, datadir, path)
        return attributes.get(attribute, target)

    def list_attributes(self, name: str, handle: Handle | None = None) -> list[str]:
        """The user's extended attributes (the pool's own are answered, not listed)."""
        return attributes.names(self._target(name, handle)[0])

    def set_attribute(
        self, name: str, attribute: str, value: bytes, flags: int, handle: Handle | None = None
    ) -> None:
        attributes.check_changeable(attribute)
        target = self._target(name, handle)[0]
        os.setxattr(target, attribute, value, flags, **checksums.no_follow(target))

    def remove_attribute(self, name: str, attribute: str, handle: Handle | None = None) -> None:
        attributes.check_changeable(attribute)
        target = self._target(name, handle)[0]
        os.removexattr(target, attribute, **checksums.no_follow(target))

    def unlink(self, name: str) -> None:
        """Remove every copy, so a deleted file never returns from a lower datadir."""
        self.refuse_if_hung_may_hold(name)
        copies = self.copies(name)
        open_file = self._open_files.get(name)
        if not copies and not (open_file is not None and open_file.new):
            raise failure(errno.ENOENT, name)
        first_error: OSError | None = None
        for copy in copies:
            self.checksummer.cancel(copy.path)
            try:
                os.unlink(copy.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove %s: %s", copy.path, exc.strerror)
                first_error = first_error or exc
                continue
            copy.datadir.names.remove(name)
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
        self.refuse_if_hung_may_hold(old)
        self.refuse_if_hung_may_hold(new)
        moving = self._open_files.get(old)
        being_written = moving is not None and moving.new
        sources = [] if being_written else self.copies(old)
        if not sources and not being_written:
            raise failure(errno.ENOENT, old)
        targets = self.copies(new)
        target_open = self._open_files.get(new)
        if no_replace and (targets or (target_open is not None and target_open.new)):
            raise failure(errno.EEXIST, new)
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
            self.checksummer.renamed(source.path, source.datadir.path_of(new))
            source.datadir.names.remove(old)
            source.datadir.names.add(new)
            renamed_in.add(source.datadir.path)
        for target in targets:
            if target.datadir.path not in renamed_in:
                self.checksummer.cancel(target.path)
                try:
                    os.unlink(target.path)
                except OSError as exc:
                    log.error("cannot remove replaced copy %s: %s", target.path, exc.strerror)
                else:
                    target.datadir.names.remove(new)
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

    # ------------------------------------------------------------------ moves

    def datadir(self, path: str) -> Datadir:
        """The datadir at ``path`` (as configured), or ENOENT."""
        try:
            return self._datadir_by_path[path]
        except KeyError:
            raise failure(errno.ENOENT, f"{path} is not a datadir of this pool") from None

    def open_file(self, name: str) -> OpenFile | None:
        """The open file of ``name``, if any handle has it open (moves look)."""
        return self._open_files.get(name)

    # ------------------------------------------------------------------ space

    def space(self) -> PoolSpace:
        """The datadirs' filesystems added up, each once (``statfs``); a hung
        datadir is left out."""
        answering = [datadir.path for datadir in self.datadirs if not datadir.hung]
        return space.measure(answering, self.name_max)
