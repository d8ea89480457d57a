"""The FUSE layer: kernel requests in, pool calls out.

Each handler translates one request: inode numbers to names (through
:class:`~fusestore.fuse.inodes.InodeTable`), file handles to pool handles, stat
results to the kernel's attribute layout. A handler returns the reply's
payload, or raises ``OSError``, which the request loop answers with its errno
(``requestloop.py``; it also logs, and turns anything unexpected into EIO).

How an open file's bytes travel (``open``): with FUSE passthrough (Linux 6.9+,
root), a read-only open of a file nobody is writing is handed to the kernel,
which then reads the backing file itself, as fast as the disk, and so is a
writable open the pool allows (``Pool.writes_pass_through``: an existing
file in a datadir with headroom); every other
open is ``direct_io``: its reads and writes come to the pool, which moves a
file whose datadir fills up (README, "How it behaves": *Spill-over*), and no
page cache of the mount can go stale. The kernel fails (EIO) an open that is
not in passthrough while the file is open in passthrough, and wants one
backing file per file: so a writer that opens a file being read joins its
passthrough (registered read-write for that reason) and writes straight to
the datadir, without the move on a full datadir. Without passthrough, opens
use the page cache.

Extended attributes (``getxattr`` and friends) are the pool's
(``fusestore/pool/attributes.py``): the user's ``user.*`` on the backing file,
and the pool's own ``user.fusestore.*``. A checksum still being computed is
waited for, with the request lock released so the pool serves others
meanwhile, for at most ``CHECKSUM_WAIT`` seconds. Since the mount answers
``getxattr``, the kernel would ask for ``security.capability`` before each
write that does not come to the pool as direct I/O (a round trip per
passthrough write); with ``FUSE_HANDLE_KILLPRIV_V2`` the daemon clears
setuid/setgid itself and the kernel asks once per file.

The pool's calls are plain system calls made from the request thread. On the
datadirs fusestore targets (local disks, tmpfs) they take microseconds, far
less than handing each one to a worker thread would cost; a slow datadir
stalls other requests meanwhile, and one that stops answering is found hung
and its stuck requests abandoned (``rescue.py``, docs/design.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fusestore.fuse import holders
from fusestore.fuse import protocol as p
from fusestore.fuse.dirents import PackedListing, PackedPart
from fusestore.fuse.inodes import ROOT_INODE, InodeTable
from fusestore.pool.memory import give_back_memory
from fusestore.pool.openfiles import BACKING_FLAGS, Handle, OpenFile, without_set_id_bits
from fusestore.pool.pool import Pool
from fusestore.pool.space import NAME_MAX

log = logging.getLogger(__name__)

# How long the kernel may trust what we told it. Short, because the datadirs
# are the only state and other programs may change them: a file added or
# removed directly in a datadir shows through the mount within this time.
ENTRY_TIMEOUT = 1
ATTR_TIMEOUT = 1
NEGATIVE_TIMEOUT = 1

# The st_blksize the pool reports: programs that size their buffers by it
# (cp, rsync, qemu-img) then write 1 MiB per request, the most the kernel sends
# in one, instead of 128 KiB: each request has a fixed cost in the daemon.
PREFERRED_IO_SIZE = 1024 * 1024

# How long a getxattr of a checksum being computed waits for it: longer than
# a 4 GiB image takes to hash here; a longer wait answers ENODATA.
CHECKSUM_WAIT = 10
# A listing holding this many bytes of entries (some 60,000 names) gives its
# memory back to the system at releasedir (see give_back_memory).
LARGE_LISTING = 4 << 20

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _attr(inode: int, st: os.stat_result, nlink: int | None = None) -> bytes:
    return p.attr_of(inode, st, nlink, PREFERRED_IO_SIZE)


def _entry(inode: int, st: os.stat_result) -> bytes:
    head = p.ENTRY_OUT_HEAD.pack(inode, 0, ENTRY_TIMEOUT, ATTR_TIMEOUT, 0, 0)
    return head + _attr(inode, st)


def _attr_reply(inode: int, st: os.stat_result, nlink: int | None = None) -> bytes:
    return p.ATTR_OUT_HEAD.pack(ATTR_TIMEOUT, 0, 0) + _attr(inode, st, nlink)


def _sized(size: int, value: bytes) -> bytes:
    """A getxattr/listxattr reply: the room needed when asked with size 0, else the value."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, f"{len(value)} bytes do not fit in {size}")
    return value


# A negative lookup the kernel may cache for NEGATIVE_TIMEOUT.
_NO_SUCH_ENTRY = p.ENTRY_OUT_HEAD.pack(0, 0, NEGATIVE_TIMEOUT, 0, 0, 0) + bytes(p.ATTR.size)


def _name(raw: bytes) -> str:
    """A request's name, refused at once if no filesystem could hold it.

    The kernel does not check the length of names for FUSE; a longer name
    would otherwise reach the datadirs and fail there, late and noisily.
    (New names are checked against the datadirs' own limit by the pool.)
    """
    if len(raw) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"a name of {len(raw)} bytes (at most {NAME_MAX})")
    return os.fsdecode(raw)


# Where the new entry's name starts in the requests the pool refuses: after
# fuse_mkdir_in (mode, umask), fuse_mknod_in (mode, rdev, umask, padding),
# fuse_link_in (the old inode); a symlink's name comes first, then its target.
_NAME_OFFSETS = {p.MKDIR: 8, p.MKNOD: 16, p.LINK: 8, p.SYMLINK: 0}


@dataclass(eq=False)
class _Backing:
    """A file registered with the kernel for passthrough, and how many opens use it."""

    open_file: OpenFile
    backing_id: int
    users: int = 0
    # For a new file: the thread that created it, and when (holders.py).
    creator_pid: int = 0
    created: int = 0


class Operations:
    """One flat directory (the root) whose files are the pool's files."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # Set by the request loop before each handler: the thread that made the request.
        self.caller_pid = 0
        self.inodes = InodeTable()
        self._handles: dict[int, Handle] = {}
        self._handle_inodes: dict[int, int] = {}
        self._listings: dict[int, PackedListing | None] = {}
        self._next_fh = itertools.count(1)
        # Set by the request loop: the /dev/fuse descriptor, for notifications
        # and (once the kernel agreed to passthrough) to register backing files.
        self.device: int | None = None
        self.passthrough = False
        # Set by the request loop: a ``with`` block in which other requests run.
        self.outside_lock: Callable[[], contextlib.AbstractContextManager[None]] = (
            contextlib.nullcontext
        )
        self._backings: dict[OpenFile, _Backing] = {}
        self._passthrough_handles: dict[int, _Backing] = {}
        self.handlers = {
            p.LOOKUP: self.lookup,
            p.FORGET: self.forget,
            p.BATCH_FORGET: self.batch_forget,
            p.GETATTR: self.getattr,
            p.SETATTR: self.setattr,
            p.UNLINK: self.unlink,
            p.RENAME: self.rename,
            p.RENAME2: self.rename2,
            p.RMDIR: self.rmdir,
            **{opcode: self._refusal(offset) for opcode, offset in _NAME_OFFSETS.items()},
            p.OPEN: self.open,
            p.CREATE: self.create,
            p.READ: self.read,
            p.WRITE: self.write,
            p.FLUSH: self.flush,
            p.FSYNC: self.fsync,
            p.RELEASE: self.release,
            p.OPENDIR: self.opendir,
            p.READDIR: self.readdir,
            p.RELEASEDIR: self.releasedir,
            p.STATFS: self.statfs,
            p.GETXATTR: self.getxattr,
            p.LISTXATTR: self.listxattr,
            p.SETXATTR: self.setxattr,
            p.REMOVEXATTR: self.removexattr,
            p.LSEEK: self.lseek,
            p.FALLOCATE: self.fallocate,
            p.COPY_FILE_RANGE: self.copy_file_range,
        }

    # ---------------------------------------------------------------- helpers

    def _root_stat(self) -> os.stat_result:
        return self.pool.root_stat()

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

    def _new_handle(self, inode: int, handle: Handle, uid: int = 0) -> bytes:
        """Register the handle; the fuse_open_out that tells the kernel how to do its I/O.

        ``uid``: who opens it. A writer other than root whose writes go
        through passthrough loses the file's setuid and setgid bits now: the
        kernel leaves that to us (HANDLE_KILLPRIV_V2) and its writes will
        never reach us (root keeps them, having CAP_FSETID).
        """
        fh = next(self._next_fh)
        self._handles[fh] = handle
        self._handle_inodes[fh] = inode
        if not self.passthrough:
            return p.OPEN_OUT.pack(fh, 0, 0)
        open_file = handle.open_file
        backing = self._backings.get(open_file)
        # A reader of a file nobody writes, or a writer the pool lets write
        # straight to the disk (Pool.writes_pass_through), starts passthrough.
        alone = open_file.handles == {handle}
        if (
            backing is None
            and not open_file.has_writer(besides=handle)
            and (not handle.writable or (alone and self.pool.writes_pass_through(handle)))
        ):
            backing = self._register_backing(open_file, handle)
            if backing is not None and open_file.new:
                backing.creator_pid, backing.created = self.caller_pid, holders.clock_ticks()
        if backing is None:
            return p.OPEN_OUT.pack(fh, p.FOPEN_DIRECT_IO, 0)
        # The kernel wants every open of a file that is open in passthrough to
        # be in passthrough on the same backing file, even a writer's.
        backing.users += 1
        self._passthrough_handles[fh] = backing
        if handle.writable and uid != 0 and handle.drop_set_id_bits():
            self._invalidate_attributes(inode)
        # Closing a reader has nothing to publish: spare it the FLUSH round trip.
        flags = p.FOPEN_PASSTHROUGH | (0 if handle.writable else p.FOPEN_NOFLUSH)
        return p.OPEN_OUT.pack(fh, flags, backing.backing_id)

    def _register_backing(self, open_file: OpenFile, handle: Handle) -> _Backing | None:
        # Registered read-write when the datadir allows it: a writer that
        # opens the file while it is open for reading writes through it.
        # The descriptor create made is one already (read-write, nothing
        # else): spare the open.
        fd = handle.fd
        with contextlib.suppress(OSError):
            if open_file.path is not None and handle.flags != os.O_RDWR | BACKING_FLAGS:
                fd = os.open(open_file.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        request = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(self.device, p.DEV_IOC_BACKING_OPEN, request)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning(
                "passthrough refused (%s): reads of %r go through fusestore", exc, open_file.name
            )
            return None
        finally:
            if fd != handle.fd:
                os.close(fd)
        backing = self._backings[open_file] = _Backing(open_file, backing_id)
        open_file.in_passthrough = True
        if handle.writable:
            open_file.kernel_writes = True
        return backing

    def _release_backing(self, fh: int) -> None:
        backing = self._passthrough_handles.pop(fh, None)
        if backing is None:
            return
        backing.users -= 1
        if backing.users:
            return
        del self._backings[backing.open_file]
        backing.open_file.in_passthrough = False
        try:
            fcntl.ioctl(
                self.device,  # type: ignore[arg-type]
                p.DEV_IOC_BACKING_CLOSE,
                backing.backing_id.to_bytes(4, "little"),
            )
        except OSError as exc:
            log.warning("cannot unregister backing file %d: %s", backing.backing_id, exc)

    @staticmethod
    def _only_root(parent_inode: int) -> None:
        if parent_inode != ROOT_INODE:
            raise OSError(errno.ENOTDIR, "the pool has no subdirectories")

    # ------------------------------------------------------------- namespace

    def lookup(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._only_root(parent)
        raw = p.split_name(body)
        if raw in (b".", b".."):
            return _entry(ROOT_INODE, self._root_stat())
        name = _name(raw)
        try:
            st = self.pool.stat(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return _NO_SUCH_ENTRY
            raise
        return _entry(self.inodes.remember(name), st)

    def forget(self, inode: int, uid: int, gid: int, body: memoryview) -> None:
        (count,) = p.FORGET_IN.unpack_from(body)
        self.inodes.forget(inode, count)

    def batch_forget(self, inode: int, uid: int, gid: int, body: memoryview) -> None:
        count, _ = p.BATCH_FORGET_IN.unpack_from(body)
        for index in range(count):
            forgotten, lookups = p.FORGET_ONE.unpack_from(
                body, p.BATCH_FORGET_IN.size + index * p.FORGET_ONE.size
            )
            self.inodes.forget(forgotten, lookups)

    def getattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        if inode == ROOT_INODE:
            return _attr_reply(ROOT_INODE, self._root_stat(), nlink=2)
        return _attr_reply(inode, self._stat_inode(inode))

    def setattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fields = p.SETATTR_IN.unpack_from(body)
        valid, fh, size, atime, mtime = fields[0], fields[2], fields[3], fields[5], fields[6]
        atime_ns, mtime_ns, mode = fields[8], fields[9], fields[11]
        new_uid, new_gid = fields[13], fields[14]
        now = time.time_ns()
        atime_total = now if valid & p.FATTR_ATIME_NOW else atime * 1_000_000_000 + atime_ns
        mtime_total = now if valid & p.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtime_ns
        mode_value = mode if valid & p.FATTR_MODE else None
        uid_value = new_uid if valid & p.FATTR_UID else None
        gid_value = new_gid if valid & p.FATTR_GID else None
        atime_value = atime_total if valid & (p.FATTR_ATIME | p.FATTR_ATIME_NOW) else None
        mtime_value = mtime_total if valid & (p.FATTR_MTIME | p.FATTR_MTIME_NOW) else None
        if inode == ROOT_INODE:
            self.pool.set_root_attributes(
                mode=mode_value,
                uid=uid_value,
                gid=gid_value,
                atime_ns=atime_value,
                mtime_ns=mtime_value,
            )
            return _attr_reply(ROOT_INODE, self._root_stat(), nlink=2)
        handle = self._handles.get(fh) if valid & p.FATTR_FH else None
        name = self.inodes.name_of(inode)
        if name is None and handle is None:
            handle = self._orphan_handle(inode)
        st = self.pool.set_attributes(
            name or "",
            handle,
            mode=mode_value,
            uid=uid_value,
            gid=gid_value,
            size=size if valid & p.FATTR_SIZE else None,
            atime_ns=atime_value,
            mtime_ns=mtime_value,
        )
        if valid & p.FATTR_KILL_SUIDGID and mode_value is None:
            # A truncate or chown by someone without CAP_FSETID (the kernel
            # leaves this to us, HANDLE_KILLPRIV_V2): as a local filesystem.
            kept = without_set_id_bits(st.st_mode)
            if kept != st.st_mode:
                st = self.pool.set_attributes(name or "", handle, mode=kept)
        return _attr_reply(inode, st)

    def unlink(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._only_root(parent)
        name = _name(p.split_name(body))
        self.pool.unlink(name)
        self.inodes.unlinked(name)
        return b""

    def rename(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        (new_parent,) = p.RENAME_IN.unpack_from(body)
        return self._rename(parent, new_parent, 0, body[p.RENAME_IN.size :])

    def rename2(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        new_parent, flags, _ = p.RENAME2_IN.unpack_from(body)
        return self._rename(parent, new_parent, flags, body[p.RENAME2_IN.size :])

    def _rename(self, parent: int, new_parent: int, flags: int, names: memoryview) -> bytes:
        self._only_root(parent)
        self._only_root(new_parent)
        if flags & p.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        raw_old, raw_new = p.split_two_names(names)
        old, new = _name(raw_old), _name(raw_new)
        self.pool.rename(old, new, no_replace=bool(flags & p.RENAME_NOREPLACE))
        if old != new:
            self.inodes.renamed(old, new)
        return b""

    def rmdir(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._only_root(parent)
        self.pool.locate(_name(p.split_name(body)))
        raise OSError(errno.ENOTDIR, "the pool holds only files")

    @staticmethod
    def _refusal(name_offset: int) -> Callable[[int, int, int, memoryview], bytes]:
        """The handler of a request for a directory, link or special file: EPERM,
        after ENAMETOOLONG for a name that could not exist anyway."""

        def refuse(parent: int, uid: int, gid: int, body: memoryview) -> bytes:
            _name(p.split_name(body[name_offset:]))
            raise OSError(errno.EPERM, "the pool holds only regular files")

        return refuse

    # ------------------------------------------------------------ open files

    def open(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        flags, _ = p.OPEN_IN.unpack_from(body)
        if inode == ROOT_INODE:
            raise OSError(errno.EISDIR, "the root is a directory")
        handle = self.pool.open(self._name_of(inode), flags)
        return self._new_handle(inode, handle, uid)

    def create(self, parent: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._only_root(parent)
        flags, mode, umask, _ = p.CREATE_IN.unpack_from(body)
        name = _name(p.split_name(body[p.CREATE_IN.size :]))
        handle = self.pool.create(name, mode & ~umask, uid, gid, flags)
        inode = self.inodes.remember(name)
        return _entry(inode, handle.stat()) + self._new_handle(inode, handle, uid)

    def read(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        return self.pool.read(self._handles[fh], offset, size)

    def write(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        handle, offset, data = self._write_request(inode, body)
        return p.WRITE_OUT.pack(self.pool.write(handle, offset, data), 0)

    def start_write(self, inode: int, body: memoryview) -> Callable[[], bytes] | None:
        """A WRITE as work that may run beside other writes (see requestlock.py), or None."""
        work = self.pool.start_write(*self._write_request(inode, body))
        if work is None:
            return None
        return lambda: p.WRITE_OUT.pack(work(), 0)

    def _write_request(self, inode: int, body: memoryview) -> tuple[Handle, int, memoryview]:
        """A WRITE's handle, offset and data (fuse_write_in is laid out as fuse_read_in).

        A writer without CAP_FSETID first loses the file's setuid and setgid
        bits, as on a local filesystem (the kernel leaves that to the server
        on direct_io writes; the daemon itself writes as root).
        """
        fh, offset, size, write_flags, *_ = p.READ_IN.unpack_from(body)
        handle = self._handles[fh]
        if write_flags & p.WRITE_KILL_SUIDGID and handle.drop_set_id_bits():
            self._invalidate_attributes(inode)
        return handle, offset, body[p.READ_IN.size : p.READ_IN.size + size]

    def _invalidate_attributes(self, inode: int) -> None:
        """Tell the kernel to forget the attributes it caches for ``inode``
        (a change it did not ask for, such as a mode, would show late)."""
        if self.device is None:
            return
        payload = p.NOTIFY_INVAL_INODE_OUT.pack(inode, -1, 0)
        header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(payload), p.NOTIFY_INVAL_INODE, 0)
        try:
            os.writev(self.device, [header, payload])
        except OSError as exc:
            log.warning("cannot tell the kernel that inode %d changed: %s", inode, exc)

    def lseek(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, offset, whence, _ = p.LSEEK_IN.unpack_from(body)
        return p.LSEEK_OUT.pack(self.pool.seek(self._handles[fh], offset, whence))

    def fallocate(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body)
        self.pool.allocate(self._handles[fh], offset, length, mode)
        return b""

    def copy_file_range(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh_in, offset_in, _, fh_out, offset_out, length, _ = p.COPY_FILE_RANGE_IN.unpack_from(body)
        source, target = self._handles[fh_in], self._handles[fh_out]
        copied = self.pool.copy_range(source, offset_in, target, offset_out, length)
        return p.WRITE_OUT.pack(copied, 0)

    def flush(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        (fh, *_) = p.FLUSH_IN.unpack_from(body)
        handle = self._handles[fh]
        self.pool.flush(handle, still_open=self._still_open_elsewhere(fh, inode, handle))
        return b""

    def _still_open_elsewhere(self, fh: int, inode: int, handle: Handle) -> bool:
        """Whether a new file the kernel writes through passthrough keeps
        descriptors after this close (holders.py): it is not published yet.
        Other files need not know: their writes come here (publish.take_back)."""
        backing = self._passthrough_handles.get(fh)
        open_file = handle.open_file
        if backing is None or not open_file.new or open_file.name is None:
            return False
        if open_file.handles != {handle}:
            return False  # not its last handle: nothing is published anyway
        return holders.still_open(
            open_file.name, inode, self.caller_pid, backing.creator_pid, backing.created
        )

    def fsync(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, fsync_flags, _ = p.FSYNC_IN.unpack_from(body)
        self.pool.fsync(self._handles[fh], bool(fsync_flags & p.FSYNC_FDATASYNC))
        return b""

    def release(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        (fh, *_) = p.RELEASE_IN.unpack_from(body)
        handle = self._handles.pop(fh)
        del self._handle_inodes[fh]
        self._release_backing(fh)
        self.pool.release(handle)
        return b""

    # ------------------------------------------------------------- directory

    def opendir(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._only_root(inode)
        fh = next(self._next_fh)
        self._listings[fh] = None  # listed at the first readdir
        return p.OPEN_OUT.pack(fh, 0, 0)

    def readdir(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes | memoryview:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        listing = self._listings[fh]
        if listing is None or offset == 0:
            # One snapshot per opendir, taken when the reading starts: a large
            # listing is read in many chunks, and re-listing every datadir
            # for each chunk would be quadratic.
            known = self._known_inodes()
            first, rest = self.pool.list_names(
                lambda names, part: PackedPart(
                    names, known, part, dots_inode=ROOT_INODE if part == 0 else None
                )
            )
            listing = self._listings[fh] = PackedListing(first, rest)
        return listing.chunk(offset, size)

    def _known_inodes(self) -> dict[bytes, int]:
        """The inode numbers the kernel holds, by encoded name (a copy: parts of a
        listing are packed on a worker thread while requests change the table)."""
        named = self.inodes.named()
        if not named:
            return {}
        # One encoding of all names joined: a fifth of encoding them one by one.
        encoded = "\0".join(named).encode(_FS_ENCODING, _FS_ERRORS).split(b"\0")
        return dict(zip(encoded, named.values(), strict=True))

    # --------------------------------------------------- extended attributes

    def _file_of(self, inode: int) -> tuple[str, Handle | None]:
        """The name of a file, or the handle of one unlinked while open."""
        if inode == ROOT_INODE:
            raise OSError(errno.ENOTSUP, "the pool's root keeps no extended attributes")
        name = self.inodes.name_of(inode)
        return ("", self._orphan_handle(inode)) if name is None else (name, None)

    def getxattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        attribute = os.fsdecode(p.split_name(body[p.GETXATTR_IN.size :]))
        if inode == ROOT_INODE:
            raise OSError(errno.ENODATA, attribute)
        name, handle = self._file_of(inode)
        due = None if handle else self.pool.checksums_due(name, attribute)
        if due is not None and not due.is_set():
            with self.outside_lock():
                due.wait(CHECKSUM_WAIT)
            name, handle = self._file_of(inode)  # anything may have happened meanwhile
        return _sized(size, self.pool.get_attribute(name, attribute, handle))

    def listxattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        if inode == ROOT_INODE:
            return _sized(size, b"")
        names = self.pool.list_attributes(*self._file_of(inode))
        return _sized(size, b"".join(os.fsencode(n) + b"\0" for n in names))

    def setxattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        size, flags = p.SETXATTR_IN.unpack_from(body)
        raw = p.split_name(body[p.SETXATTR_IN.size :])
        start = p.SETXATTR_IN.size + len(raw) + 1
        value = bytes(body[start : start + size])
        name, handle = self._file_of(inode)
        self.pool.set_attribute(name, os.fsdecode(raw), value, flags, handle)
        return b""

    def removexattr(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        attribute = os.fsdecode(p.split_name(body))
        name, handle = self._file_of(inode)
        self.pool.remove_attribute(name, attribute, handle)
        return b""

    def releasedir(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        (fh, *_) = p.RELEASE_IN.unpack_from(body)
        listing = self._listings.pop(fh, None)
        if listing is not None and listing.size >= LARGE_LISTING:
            del listing  # the only reference: its entries are freed here
            give_back_memory()
        return b""

    def statfs(self, inode: int, uid: int, gid: int, body: memoryview) -> bytes:
        space = self.pool.space()
        return p.KSTATFS.pack(
            space.total_blocks,
            space.free_blocks,
            space.available_blocks,
            space.total_inodes,
            space.free_inodes,
            space.block_size,
            space.name_max,
            space.block_size,
            0,
        )
