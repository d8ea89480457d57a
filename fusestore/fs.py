"""The FUSE layer: kernel requests in, pool calls out.

Each handler translates one request: inode numbers to names (through
:class:`~fusestore.inodes.InodeTable`), file handles to pool handles, stat
results to ``EntryAttributes``. Every ``OSError`` from the pool becomes a
``FUSEError`` with the same errno in one place, :func:`_translate_errors`;
anything unexpected is logged with its traceback and answered with ``EIO``.

Extended attributes are not implemented (pyfuse3 answers ENOSYS): the
kernel then stops asking, where it would otherwise ask ``getxattr`` for
``security.capability`` before every write — a round trip per ``write()``.

The pool's calls are plain system calls made from the trio thread. On the
datadirs fusestore targets (local disks, tmpfs) they take microseconds, far
less than handing each one to a worker thread would cost; a slow datadir
stalls other requests meanwhile (see the README's design notes).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3

from fusestore.inodes import ROOT_INODE, InodeTable
from fusestore.openfiles import Handle
from fusestore.pool import Pool

log = logging.getLogger(__name__)

# How long the kernel may trust what we told it. Short, because the datadirs
# are the only state and other programs may change them: a file added or
# removed directly in a datadir shows through the mount within this time.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
NEGATIVE_TIMEOUT = 1.0

# The st_blksize the pool reports: programs that size their buffers by it
# (cp, rsync, qemu-img) then write 1 MiB per request, the most the kernel sends
# in one, instead of 128 KiB: each request has a fixed cost in the daemon.
PREFERRED_IO_SIZE = 1024 * 1024

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _translate_errors(handler: _Handler) -> _Handler:
    """Turn pool errors into errnos for the kernel, logging each request in debug mode."""
    operation = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> Any:
        if self.debug:
            log.debug("%s%r", operation, args)
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if self.debug or exc.errno not in (errno.ENOENT, errno.EEXIST):
                log.log(
                    logging.DEBUG if self.debug else logging.INFO,
                    "%s: %s",
                    operation,
                    exc,
                )
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed unexpectedly", operation, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(_Handler, wrapper)


def _attributes(inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode  # type: ignore[assignment]
    attr.generation = 0
    attr.entry_timeout = ENTRY_TIMEOUT
    attr.attr_timeout = ATTR_TIMEOUT
    attr.st_mode = st.st_mode  # type: ignore[assignment]
    attr.st_nlink = st.st_nlink
    attr.st_uid = st.st_uid
    attr.st_gid = st.st_gid
    attr.st_rdev = 0
    attr.st_size = st.st_size
    attr.st_blksize = max(st.st_blksize, PREFERRED_IO_SIZE)
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


def _no_such_entry() -> pyfuse3.EntryAttributes:
    """A negative lookup the kernel may cache for NEGATIVE_TIMEOUT."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0  # type: ignore[assignment]
    attr.entry_timeout = NEGATIVE_TIMEOUT
    return attr


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    """One flat directory (the root) whose files are the pool's files."""

    supports_dot_lookup = False

    def __init__(self, pool: Pool, debug: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.debug = debug
        self.inodes = InodeTable()
        self._handles: dict[int, Handle] = {}
        self._handle_inodes: dict[int, int] = {}
        self._listings: dict[int, list[tuple[str, str | None]]] = {}
        self._next_fh = itertools.count(1)

    # ---------------------------------------------------------------- helpers

    def _root_attributes(self) -> pyfuse3.EntryAttributes:
        # The root looks like the top-priority datadir: its owner and mode
        # decide who may create files through the mount.
        st = os.stat(self.pool.datadirs[0].path)
        attr = _attributes(ROOT_INODE, st)
        attr.st_nlink = 2
        return attr

    def _name_of(self, inode: int) -> str:
        name = self.inodes.name_of(inode)
        if name is None:
            raise OSError(errno.ENOENT, f"inode {inode} was unlinked")
        return name

    def _stat_inode(self, inode: int) -> os.stat_result:
        name = self.inodes.name_of(inode)
        if name is not None:
            return self.pool.stat(name)
        return self._orphan_handle(inode).stat()

    def _orphan_handle(self, inode: int) -> Handle:
        """A handle of a file unlinked while open: the only way left to its bytes."""
        for fh, handle_inode in self._handle_inodes.items():
            if handle_inode == inode:
                return self._handles[fh]
        raise OSError(errno.ENOENT, f"inode {inode} was unlinked")

    def _new_handle(self, inode: int, handle: Handle) -> pyfuse3.FileInfo:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        self._handle_inodes[fh] = inode
        return pyfuse3.FileInfo(fh=fh)  # type: ignore[arg-type]

    @staticmethod
    def _only_root(parent_inode: int) -> None:
        if parent_inode != ROOT_INODE:
            raise OSError(errno.ENOTDIR, "the pool has no subdirectories")

    # ------------------------------------------------------------- namespace

    @_translate_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._only_root(parent_inode)
        if name in (b".", b".."):
            return self._root_attributes()
        decoded = _name(name)
        try:
            st = self.pool.stat(decoded)
        except FileNotFoundError:
            return _no_such_entry()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return _no_such_entry()
            raise
        return _attributes(self.inodes.remember(decoded), st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @_translate_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attributes()
        return _attributes(inode, self._stat_inode(inode))

    @_translate_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return await self._set_root_attributes(attr, fields)
        handle = self._handles.get(fh) if fh is not None else None
        name = self.inodes.name_of(inode)
        if name is None and handle is None:
            handle = self._orphan_handle(inode)
        st = self.pool.set_attributes(
            name or "",
            handle,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return _attributes(inode, st)

    async def _set_root_attributes(
        self, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> pyfuse3.EntryAttributes:
        # chmod/chown of the mount point applies to every datadir, so the
        # permission the kernel checks matches what the datadirs enforce.
        for datadir in self.pool.datadirs:
            if fields.update_uid or fields.update_gid:
                os.chown(
                    datadir.path,
                    attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1,
                )
            if fields.update_mode:
                os.chmod(datadir.path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            top = self.pool.datadirs[0].path
            current = os.stat(top)
            os.utime(
                top,
                ns=(
                    attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns,
                ),
            )
        return self._root_attributes()

    @_translate_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._only_root(parent_inode)
        decoded = _name(name)
        self.pool.unlink(decoded)
        self.inodes.unlinked(decoded)

    @_translate_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._only_root(parent_inode_old)
        self._only_root(parent_inode_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old, new = _name(name_old), _name(name_new)
        self.pool.rename(old, new, no_replace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        if old != new:
            self.inodes.renamed(old, new)

    @_translate_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._only_root(parent_inode)
        self.pool.locate(_name(name))
        raise OSError(errno.ENOTDIR, "the pool holds only files")

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------ open files

    @_translate_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == ROOT_INODE:
            raise OSError(errno.EISDIR, "the root is a directory")
        handle = self.pool.open(self._name_of(inode), flags)
        return self._new_handle(inode, handle)

    @_translate_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._only_root(parent_inode)
        decoded = _name(name)
        handle = self.pool.create(decoded, mode & ~ctx.umask, ctx.uid, ctx.gid, flags)
        inode = self.inodes.remember(decoded)
        return self._new_handle(inode, handle), _attributes(inode, handle.stat())

    @_translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._handles[fh].read(off, size)

    @_translate_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.pool.write(self._handles[fh], off, buf)

    @_translate_errors
    async def flush(self, fh: int) -> None:
        self.pool.flush(self._handles[fh])

    @_translate_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.pool.fsync(self._handles[fh], datasync)

    @_translate_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        del self._handle_inodes[fh]
        self.pool.release(handle)

    # ------------------------------------------------------------- directory

    @_translate_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise OSError(errno.ENOTDIR, "the pool has no subdirectories")
        fh = next(self._next_fh)
        # One snapshot per opendir: a large listing is read in many chunks,
        # and re-listing every datadir for each chunk would be quadratic.
        self._listings[fh] = self.pool.list_names()
        return fh

    @_translate_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings[fh]
        for index in range(start_id, len(listing)):
            name, path = listing[index]
            try:
                st = self.pool.stat_listed(name, path)
            except OSError:
                continue  # removed since the snapshot
            inode = self.inodes.inode_for(name)
            attr = _attributes(inode, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index + 1):
                self.inodes.discard_if_unused(inode)
                return
            self.inodes.add_lookup(inode)

    @_translate_errors
    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    @_translate_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        space = self.pool.space()
        data = pyfuse3.StatvfsData()
        data.f_bsize = space.block_size
        data.f_frsize = space.block_size
        data.f_blocks = space.total_blocks
        data.f_bfree = space.free_blocks
        data.f_bavail = space.available_blocks
        data.f_files = space.total_inodes
        data.f_ffree = space.free_inodes
        data.f_favail = space.free_inodes
        data.f_namemax = space.name_max
        return data
