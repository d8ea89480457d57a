"""The backing datadirs as one flat namespace: find, create, rename, remove.

The pool is the only code that touches the datadirs. It knows no FUSE: it
takes names and returns stat results, handles and ``OSError``s with the errno
the caller should see. The datadirs themselves are the only state; nothing is
cached about files that are not open, so programs that change the datadirs
directly are seen at the next request.

Rules (see DESIGN.md "The namespace"): only regular files are part of the
pool, and symlinks are never followed; a name is served by the first datadir
in priority order that holds it; ``unlink`` removes every copy; ``rename``
renames every copy and removes the target's copies elsewhere.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from fusestore.config import ConfigError, PoolConfig
from fusestore.openfiles import Handle, OpenFile
from fusestore.placement import DatadirSpace, choose_datadir, lookup_order

log = logging.getLogger(__name__)

# Flags that describe how the *caller* opened the file and must not reach the
# backing descriptor: creation and truncation are done by the pool itself;
# O_APPEND is left to the kernel, which sends the right offset with each write;
# O_DIRECT is not supported by every backing filesystem (tmpfs refuses it).
_CALLER_ONLY_FLAGS = (
    os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY | os.O_DIRECT | os.O_ACCMODE
)
_BACKING_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Datadir:
    """A validated backing directory."""

    path: str
    priority: int


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


def _open_datadir(spec_path: str, priority: int) -> Datadir:
    """Create a missing datadir and prove it can be written, or raise ConfigError."""
    try:
        os.makedirs(spec_path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"datadir {spec_path!r} cannot be created: {exc.strerror}") from exc
    if not os.path.isdir(spec_path):
        raise ConfigError(f"datadir {spec_path!r} is not a directory")
    try:
        probe_fd, probe_path = tempfile.mkstemp(prefix=".fusestore-probe-", dir=spec_path)
        os.close(probe_fd)
        os.unlink(probe_path)
    except OSError as exc:
        raise ConfigError(f"datadir {spec_path!r} cannot be written: {exc.strerror}") from exc
    return Datadir(path=spec_path, priority=priority)


class Pool:
    """The datadirs of one mount, and the files open in them."""

    def __init__(self, config: PoolConfig) -> None:
        """Validate every datadir, creating missing ones; ConfigError names the first bad one."""
        datadirs = []
        seen: dict[tuple[int, int], str] = {}
        for spec in config.datadirs:
            datadir = _open_datadir(spec.path, spec.priority)
            st = os.stat(datadir.path)
            identity = (st.st_dev, st.st_ino)
            if identity in seen:
                raise ConfigError(
                    f"datadir {spec.path!r} is the same directory as {seen[identity]!r}"
                )
            seen[identity] = spec.path
            datadirs.append(datadir)
        self.datadirs: list[Datadir] = lookup_order(datadirs)
        self.min_free_space = config.min_free_space
        self._open_files: dict[str, OpenFile] = {}

    # ----------------------------------------------------------------- lookup

    def copies(self, name: str) -> list[Copy]:
        """Every regular file called ``name``, winner first."""
        return list(self._iter_copies(name))

    def locate(self, name: str) -> Copy:
        """The copy that reads see, or ENOENT."""
        for copy in self._iter_copies(name):
            return copy
        raise _fail(errno.ENOENT, name)

    def _iter_copies(self, name: str) -> Iterator[Copy]:
        # A generator so that locate() stops at the first hit.
        for datadir in self.datadirs:
            path = os.path.join(datadir.path, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                yield Copy(datadir, path, st)

    def exists(self, name: str) -> bool:
        return name in self._open_files or any(True for _ in self._iter_copies(name))

    def stat(self, name: str) -> os.stat_result:
        open_file = self._open_files.get(name)
        if open_file is not None:
            return os.fstat(open_file.any_fd())
        return self.locate(name).stat

    def list_entries(self) -> list[os.DirEntry[str]]:
        """Each visible name once, as the directory entry that serves it, in lookup order."""
        listing: dict[str, os.DirEntry[str]] = {}
        for datadir in self.datadirs:
            try:
                entries = os.scandir(datadir.path)
            except OSError as exc:
                log.error("cannot list datadir %s: %s", datadir.path, exc.strerror)
                continue
            with entries:
                for entry in entries:
                    if entry.name not in listing and entry.is_file(follow_symlinks=False):
                        listing[entry.name] = entry
        return list(listing.values())

    # -------------------------------------------------------------- placement

    def free_space(self) -> list[DatadirSpace]:
        """Each datadir's free bytes right now (statvfs ``f_bavail * f_frsize``)."""
        spaces = []
        for datadir in self.datadirs:
            try:
                vfs = os.statvfs(datadir.path)
                free = vfs.f_bavail * vfs.f_frsize
            except OSError as exc:
                log.error("cannot measure datadir %s: %s", datadir.path, exc.strerror)
                free = 0
            spaces.append(DatadirSpace(datadir.path, datadir.priority, free))
        return spaces

    def choose_datadir_for(self, name: str, needed_bytes: int = 0) -> Datadir:
        """The datadir a new file goes to, or ENOSPC with a log of what was tried."""
        spaces = self.free_space()
        chosen = choose_datadir(spaces, self.min_free_space, needed_bytes)
        if chosen is None:
            tried = ", ".join(
                f"{space.path} (priority {space.priority}, {space.free_bytes} bytes free)"
                for space in spaces
            )
            log.warning(
                "no datadir can hold %r: each needs more than %d bytes free; tried %s",
                name,
                self.min_free_space + needed_bytes,
                tried,
            )
            raise _fail(errno.ENOSPC, f"no datadir can hold {name!r}")
        return next(d for d in self.datadirs if d.path == chosen.path)

    # ----------------------------------------------------------- open/create

    def create(self, name: str, mode: int, uid: int, gid: int, flags: int) -> Handle:
        """Create ``name`` in the best datadir and open it.

        If the name exists (the kernel's negative cache can be stale when a
        file appeared directly in a datadir), ``O_EXCL`` gets EEXIST and
        otherwise the existing file is opened, as open(2) would.
        """
        if self.exists(name):
            if flags & os.O_EXCL:
                raise _fail(errno.EEXIST, name)
            return self.open(name, flags)
        datadir = self.choose_datadir_for(name)
        path = os.path.join(datadir.path, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | _BACKING_FLAGS, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        log.debug("created %r in %s", name, datadir.path)
        return self._add_handle(name, datadir.path, path, fd, writable=True)

    def open(self, name: str, flags: int) -> Handle:
        """Open an existing file; ``O_TRUNC`` truncates it."""
        open_file = self._open_files.get(name)
        if open_file is not None and open_file.path is not None:
            datadir, path = open_file.datadir, open_file.path
        else:
            copy = self.locate(name)
            datadir, path = copy.datadir.path, copy.path
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        # Writable handles read too: the kernel may read a page it is about to
        # write part of, even through a write-only descriptor.
        access = os.O_RDWR if writable else os.O_RDONLY
        backing_flags = (flags & ~_CALLER_ONLY_FLAGS) | access | _BACKING_FLAGS
        fd = os.open(path, backing_flags)
        if flags & os.O_TRUNC and writable:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                raise
        return self._add_handle(name, datadir, path, fd, writable)

    def _add_handle(self, name: str, datadir: str, path: str, fd: int, writable: bool) -> Handle:
        open_file = self._open_files.get(name)
        if open_file is None:
            open_file = OpenFile(name=name, datadir=datadir, path=path)
            self._open_files[name] = open_file
        handle = Handle(open_file=open_file, fd=fd, writable=writable)
        open_file.handles.add(handle)
        return handle

    def release(self, handle: Handle) -> None:
        """Close a handle; the last one closes the file."""
        open_file = handle.open_file
        open_file.handles.discard(handle)
        try:
            os.close(handle.fd)
        finally:
            last = not open_file.handles and open_file.name is not None
            if last and self._open_files.get(open_file.name) is open_file:
                del self._open_files[open_file.name]  # type: ignore[arg-type]

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
        if not copies:
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
        otherwise shadow or resurrect the old target, so they go.
        """
        sources = self.copies(old)
        if not sources:
            raise _fail(errno.ENOENT, old)
        targets = self.copies(new)
        if no_replace and targets:
            raise _fail(errno.EEXIST, new)
        if old == new:
            return
        renamed_in: set[str] = set()
        for position, source in enumerate(sources):
            target_path = os.path.join(source.datadir.path, new)
            try:
                os.rename(source.path, target_path)
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
        moved = self._open_files.pop(old, None)
        if moved is not None:
            moved.name = new
            if moved.path is not None:
                moved.path = os.path.join(moved.datadir, new)
            self._open_files[new] = moved

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
