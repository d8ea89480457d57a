"""faultyfs: a passthrough FUSE filesystem that fails on demand, for fault-injection tests.

Why it exists: fusestore promises what happens when a datadir's disk fails
(README, "How it behaves": *Failed writes*, *Broken disks*), and a tmpfs or a
loop-mounted ext4 cannot be told to fail one ``write`` or one ``lookup``.
faultyfs mirrors a backing directory (a tmpfs in the tests) at a mountpoint
and, when told to, answers chosen requests with an errno instead of doing
them. Used as a datadir under a fusestore pool, it is a disk that fails
exactly where and when a test wants. To make it hang, stop the process
(``SIGSTOP``); ``SIGCONT`` resumes it. SIGTERM or SIGINT, or an unmount,
end it cleanly.

Run as its own process (``tests/faulty.py`` does)::

    python -m tests.faultyfs BACKING MOUNTPOINT CONTROL_FILE

CONTROL_FILE (JSON; a missing file means no faults) is read again before any
request that comes after its inode, mtime or size changed, so a rule written
(atomically: temporary file, then rename) before a system call applies to it::

    {"faults": [{"op": "write", "name": "image", "errno": "EIO"},
                {"op": "lookup", "name": "*", "errno": "EIO"},
                {"op": "fsync", "name": ".fusestore/incoming/*", "errno": "EIO"}]}

A request whose operation is ``op`` (or any, if ``op`` is ``"*"``) on a file
or directory whose name matches ``name`` gets ``errno`` (a name from the
``errno`` module) and is not done; the first matching rule wins. ``name`` is
a shell-style pattern (``fnmatch``, where ``*`` also matches ``/``) matched
against the basename and against the path relative to BACKING; ``"*"``
matches every request, even of a file unlinked while open. A request on an
inode or an open file is matched against every name the inode has now (once
unlinked, the last one it had): fusestore writes a new file under a hidden
name (``.fusestore/incoming/…``) and links it under its name at close.
Every injected fault is logged on stderr with the path it hit:
``faultyfs: injected EIO into write of 'image'``. An optional ``"name_max": N``
makes statfs report names of at most N bytes, as a filesystem with a shorter
limit than 255 would.

``op`` is one of :data:`OPERATIONS`. Every open is ``direct_io`` and every
entry and attribute timeout 0, so each ``read``, ``write`` and ``lookup`` of
the layer above reaches this process (nothing is answered from the kernel's
caches) and a fault applies from the next call, also on files already open.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import functools
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("faultyfs")

OPERATIONS = frozenset(
    {
        *("lookup", "getattr", "setattr", "mkdir", "rmdir", "unlink", "rename", "link", "statfs"),
        *("create", "open", "read", "write", "flush", "fsync", "release"),
        *("opendir", "readdir", "fsyncdir", "releasedir"),
    }
)
ROOT = pyfuse3.ROOT_INODE
# Flags of an open that are the kernel's business or would break the reopen
# through /proc/self/fd (O_NOFOLLOW) or the offsets the kernel sends (O_APPEND).
_NOT_PASSED = (
    os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_APPEND | os.O_DIRECT | os.O_CLOEXEC
)


@dataclass(frozen=True)
class Fault:
    """One rule of the control file: ``op`` on ``name`` gets ``errno``."""

    op: str
    name: str
    code: int

    def matches(self, op: str, names: Sequence[str]) -> bool:
        if self.op not in ("*", op):
            return False
        return self.name == "*" or any(fnmatch.fnmatchcase(n, self.name) for n in names)


def parse_faults(document: object) -> list[Fault]:
    """The rules of a control file's JSON document; ValueError says what is wrong."""
    if not isinstance(document, dict) or set(document) - {"faults", "name_max"}:
        raise ValueError('the control file must be {"faults": [...], "name_max": N (optional)}')
    if not isinstance(document.get("name_max", 0), int):
        raise ValueError(f"name_max must be a whole number, not {document['name_max']!r}")
    faults = []
    for rule in document.get("faults", []):
        if not isinstance(rule, dict) or set(rule) != {"op", "name", "errno"}:
            raise ValueError(f"a fault is {{'op', 'name', 'errno'}}, not {rule!r}")
        op, name, errno_name = rule["op"], rule["name"], rule["errno"]
        if op != "*" and op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; one of {sorted(OPERATIONS)} or '*'")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a fault's name must be a non-empty pattern, not {name!r}")
        code = getattr(errno, str(errno_name), None) if str(errno_name).isupper() else None
        if not isinstance(code, int):
            raise ValueError(f"unknown errno {errno_name!r} (a name such as 'EIO')")
        faults.append(Fault(op, name, code))
    return faults


class Control:
    """The control file, read again whenever it changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self.faults: list[Fault] = []
        # The longest name statfs reports, if set: a filesystem with a limit
        # shorter than 255 bytes (as some network or encrypting ones have).
        self.name_max: int | None = None

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self.faults, self.name_max = None, [], None
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            document = json.loads(text) if text.strip() else {}
            self.faults = parse_faults(document) if document else []
            self.name_max = document.get("name_max")
        except (OSError, ValueError) as exc:
            log.error("faultyfs: ignoring control file %s: %s", self.path, exc)
            return
        shown = [(f.op, f.name, errno.errorcode[f.code]) for f in self.faults]
        log.info("faultyfs: faults now %s", shown)

    def check(self, op: str, names: Sequence[str]) -> None:
        """Raise the errno of the first rule that matches, logged, if any."""
        self.refresh()
        for fault in self.faults:
            if fault.matches(op, names):
                shown = names[0] if names else "(no name)"
                log.warning(
                    "faultyfs: injected %s into %s of %r", errno.errorcode[fault.code], op, shown
                )
                raise pyfuse3.FUSEError(fault.code)


@dataclass(eq=False)
class Inode:
    """A backing file or directory the kernel knows, held by an ``O_PATH`` descriptor."""

    number: int
    fd: int
    key: tuple[int, int]  # the backing (st_dev, st_ino)
    lookups: int = 0
    links: set[tuple[int, str]] = field(default_factory=set)  # (parent inode, name)
    last_link: tuple[int, str] | None = None

    @property
    def proc_path(self) -> str:
        """A path that reaches the file itself, even after it was renamed or unlinked."""
        return f"/proc/self/fd/{self.fd}"


T = TypeVar("T")


def request(method: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """A synchronous handler as the coroutine pyfuse3 calls; OSError becomes its errno.

    Anything else unexpected is logged and answered with EIO, so that a bug
    here fails one request instead of ending the filesystem.
    """

    @functools.wraps(method)
    async def handler(*args: Any) -> T:
        try:
            return method(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("faultyfs: %s failed unexpectedly", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


class FaultyOperations(pyfuse3.Operations):
    """Every request passed through to the backing directory, unless a fault says otherwise."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, backing: str, control: Control) -> None:
        super().__init__()
        self.control = control
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        root = Inode(ROOT, root_fd, (st.st_dev, st.st_ino), lookups=1)
        self.inodes: dict[int, Inode] = {ROOT: root}
        self.by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self.entries: dict[tuple[int, str], Inode] = {}
        self.files: dict[int, int] = {}  # file handle -> backing descriptor
        self.file_inodes: dict[int, int] = {}  # file handle -> inode number
        # directory handle -> (descriptor, inode number, names listed at the first readdir)
        self.dirs: dict[int, tuple[int, int, list[str] | None]] = {}
        self._next_inode = ROOT + 1
        self._next_handle = 1

    # ---------------------------------------------------------------- names

    def _relative(self, parent: int, name: str) -> str:
        """``name`` in directory ``parent`` as a path relative to the backing directory."""
        parts = [name]
        while parent != ROOT:
            directory = self.inodes.get(parent)
            if directory is None:
                break
            link = next(iter(directory.links), None) or directory.last_link
            if link is None:
                break
            parent, component = link
            parts.append(component)
        return "/".join(reversed(parts))

    def _entry_names(self, parent: int, name: str) -> list[str]:
        return [self._relative(parent, name), name]

    def _names(self, inode: Inode) -> list[str]:
        links = sorted(inode.links) or ([inode.last_link] if inode.last_link else [])
        return [self._relative(parent, name) for parent, name in links] + [
            name for _, name in links
        ]

    def _check(self, op: str, names: Iterable[str]) -> None:
        self.control.check(op, list(names))

    # --------------------------------------------------------------- inodes

    def _inode(self, number: int) -> Inode:
        inode = self.inodes.get(number)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode

    def _bind(self, parent: int, name: str, inode: Inode) -> None:
        old = self.entries.get((parent, name))
        if old is not None and old is not inode:
            self._unbind(parent, name)
        self.entries[(parent, name)] = inode
        inode.links.add((parent, name))
        inode.last_link = (parent, name)

    def _unbind(self, parent: int, name: str) -> None:
        inode = self.entries.pop((parent, name), None)
        if inode is not None:
            inode.links.discard((parent, name))

    def _remember(self, parent: int, name: str) -> tuple[Inode, os.stat_result]:
        """The inode of an entry, known from now on (its lookup count unchanged)."""
        directory = self._inode(parent)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        inode = self.by_key.get(key)
        if inode is None:
            inode = Inode(self._next_inode, fd, key)
            self._next_inode += 1
            self.inodes[inode.number] = inode
            self.by_key[key] = inode
        else:
            os.close(fd)
        self._bind(parent, name, inode)
        return inode, st

    def _looked_up(self, parent: int, name: str) -> pyfuse3.EntryAttributes:
        inode, st = self._remember(parent, name)
        inode.lookups += 1
        return self._attributes(inode, st)

    def _drop(self, inode: Inode, count: int) -> None:
        inode.lookups -= count
        if inode.lookups > 0 or inode.number == ROOT:
            return
        for link in list(inode.links):
            self._unbind(*link)
        del self.inodes[inode.number]
        del self.by_key[inode.key]
        os.close(inode.fd)

    @staticmethod
    def _attributes(inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode.number
        attributes.generation = 0
        attributes.entry_timeout = 0
        attributes.attr_timeout = 0
        attributes.st_mode = st.st_mode
        attributes.st_nlink = st.st_nlink
        attributes.st_uid = st.st_uid
        attributes.st_gid = st.st_gid
        attributes.st_rdev = st.st_rdev
        attributes.st_size = st.st_size
        attributes.st_blksize = st.st_blksize
        attributes.st_blocks = st.st_blocks
        attributes.st_atime_ns = st.st_atime_ns
        attributes.st_mtime_ns = st.st_mtime_ns
        attributes.st_ctime_ns = st.st_ctime_ns
        return attributes

    @staticmethod
    def _give(target: int | str, uid: int, gid: int) -> None:
        """A new entry belongs to the caller, as on a local filesystem (we run as root)."""
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(target, uid, gid)

    # ------------------------------------------------------------ namespace

    @request
    def lookup(
        self, parent: int, raw: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        name = os.fsdecode(raw)
        self._check("lookup", self._entry_names(parent, name))
        if name == ".":
            inode = self._inode(parent)
            inode.lookups += 1
            return self._attributes(inode, os.fstat(inode.fd))
        if name == "..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # only asked for with supports_dot_lookup
        return self._looked_up(parent, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for number, count in inode_list:
            inode = self.inodes.get(number)
            if inode is not None:
                try:
                    self._drop(inode, count)
                except OSError as exc:
                    log.error("faultyfs: forget of inode %d: %s", number, exc)

    @request
    def getattr(self, number: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self._inode(number)
        self._check("getattr", self._names(inode))
        return self._attributes(inode, os.fstat(inode.fd))

    @request
    def setattr(
        self,
        number: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        inode = self._inode(number)
        self._check("setattr", self._names(inode))
        path = inode.proc_path
        if fields.update_uid or fields.update_gid:
            os.chown(
                path,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if fh is not None and fh in self.files:
                os.ftruncate(self.files[fh], attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            current = os.fstat(inode.fd)
            os.utime(
                path,
                ns=(
                    attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns,
                ),
            )
        return self._attributes(inode, os.fstat(inode.fd))

    @request
    def mkdir(
        self, parent: int, raw: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        name = os.fsdecode(raw)
        self._check("mkdir", self._entry_names(parent, name))
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=self._inode(parent).fd)
        inode, _ = self._remember(parent, name)
        inode.lookups += 1
        self._give(inode.proc_path, ctx.uid, ctx.gid)
        return self._attributes(inode, os.fstat(inode.fd))

    @request
    def rmdir(self, parent: int, raw: bytes, ctx: pyfuse3.RequestContext) -> None:
        name = os.fsdecode(raw)
        self._check("rmdir", self._entry_names(parent, name))
        os.rmdir(name, dir_fd=self._inode(parent).fd)
        self._unbind(parent, name)

    @request
    def unlink(self, parent: int, raw: bytes, ctx: pyfuse3.RequestContext) -> None:
        name = os.fsdecode(raw)
        self._check("unlink", self._entry_names(parent, name))
        os.unlink(name, dir_fd=self._inode(parent).fd)
        self._unbind(parent, name)

    @request
    def rename(
        self,
        parent_old: int,
        raw_old: bytes,
        parent_new: int,
        raw_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = os.fsdecode(raw_old), os.fsdecode(raw_new)
        names = self._entry_names(parent_old, old) + self._entry_names(parent_new, new)
        self._check("rename", names)
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # fusestore renames with plain rename(2)
        os.rename(
            old,
            new,
            src_dir_fd=self._inode(parent_old).fd,
            dst_dir_fd=self._inode(parent_new).fd,
        )
        moved = self.entries.get((parent_old, old))
        self._unbind(parent_old, old)
        self._unbind(parent_new, new)
        if moved is not None:
            self._bind(parent_new, new, moved)

    @request
    def link(
        self, number: int, parent: int, raw: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self._inode(number)
        name = os.fsdecode(raw)
        self._check("link", self._names(inode) + self._entry_names(parent, name))
        # linkat(AT_SYMLINK_FOLLOW) of the /proc/self/fd link: the file itself.
        os.link(inode.proc_path, name, dst_dir_fd=self._inode(parent).fd, follow_symlinks=True)
        return self._looked_up(parent, name)

    @request
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self._check("statfs", ["."])
        vfs = os.statvfs(self.inodes[ROOT].proc_path)
        data = pyfuse3.StatvfsData()
        for attribute in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, attribute, getattr(vfs, attribute))
        self.control.refresh()
        if self.control.name_max is not None:
            data.f_namemax = self.control.name_max
        return data

    # ----------------------------------------------------------- open files

    def _new_file(self, fd: int, inode: Inode) -> pyfuse3.FileInfo:
        fh = self._next_handle
        self._next_handle += 1
        self.files[fh] = fd
        self.file_inodes[fh] = inode.number
        # direct_io, no cache: every read and write of the layer above reaches us.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _file_names(self, fh: int) -> list[str]:
        inode = self.inodes.get(self.file_inodes.get(fh, -1))
        return self._names(inode) if inode is not None else []

    @request
    def open(self, number: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self._inode(number)
        self._check("open", self._names(inode))
        fd = os.open(inode.proc_path, (flags & ~_NOT_PASSED) | os.O_CLOEXEC)
        return self._new_file(fd, inode)

    @request
    def create(
        self, parent: int, raw: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        name = os.fsdecode(raw)
        self._check("create", self._entry_names(parent, name))
        directory = self._inode(parent)
        fd = os.open(
            name,
            (flags & ~_NOT_PASSED) | (flags & os.O_EXCL) | os.O_CREAT | os.O_CLOEXEC,
            stat.S_IMODE(mode),
            dir_fd=directory.fd,
        )
        try:
            self._give(fd, ctx.uid, ctx.gid)
            inode, _ = self._remember(parent, name)
        except BaseException:
            os.close(fd)
            raise
        inode.lookups += 1
        return self._new_file(fd, inode), self._attributes(inode, os.fstat(fd))

    @request
    def read(self, fh: int, offset: int, size: int) -> bytes:
        self._check("read", self._file_names(fh))
        return os.pread(self.files[fh], size, offset)

    @request
    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._check("write", self._file_names(fh))
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.files[fh], view[done:], offset + done)
        return done

    @request
    def flush(self, fh: int) -> None:
        self._check("flush", self._file_names(fh))
        os.close(os.dup(self.files[fh]))  # what close() of the backing file would report

    @request
    def fsync(self, fh: int, datasync: bool) -> None:
        self._check("fsync", self._file_names(fh))
        (os.fdatasync if datasync else os.fsync)(self.files[fh])

    @request
    def release(self, fh: int) -> None:
        names = self._file_names(fh)
        fd = self.files.pop(fh)
        del self.file_inodes[fh]
        os.close(fd)  # closed even when a fault is reported: release has no caller to retry
        self._check("release", names)

    # ----------------------------------------------------------- directories

    @request
    def opendir(self, number: int, ctx: pyfuse3.RequestContext) -> int:
        inode = self._inode(number)
        self._check("opendir", self._names(inode) if number != ROOT else ["."])
        fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._next_handle
        self._next_handle += 1
        self.dirs[fh] = (fd, number, None)
        return fh

    @request
    def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        fd, number, names = self.dirs[fh]
        self._check("readdir", self._names(self.inodes[number]) if number != ROOT else ["."])
        if names is None or start == 0:
            names = sorted(os.listdir(fd))  # one snapshot per opendir
            self.dirs[fh] = (fd, number, names)
        for index in range(start, len(names)):
            try:
                inode, st = self._remember(number, names[index])
            except FileNotFoundError:
                continue  # removed since the snapshot
            attributes = self._attributes(inode, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attributes, index + 1):
                self._drop(inode, 0)  # not handed out: forget it if nobody else knows it
                return
            inode.lookups += 1

    @request
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd, number, _ = self.dirs[fh]
        self._check("fsyncdir", self._names(self.inodes[number]) if number != ROOT else ["."])
        (os.fdatasync if datasync else os.fsync)(fd)

    @request
    def releasedir(self, fh: int) -> None:
        fd, number, _ = self.dirs.pop(fh)
        os.close(fd)
        inode = self.inodes.get(number)
        self._check("releasedir", self._names(inode) if inode and number != ROOT else ["."])


async def serve() -> None:
    """Serve requests until unmounted, or until SIGTERM/SIGINT ends the loop."""
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultyfs", description=__doc__)
    parser.add_argument("backing", help="the directory to pass through")
    parser.add_argument("mountpoint")
    parser.add_argument("control", help="the JSON control file (need not exist)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.umask(0)  # modes come from the requests as they are
    control = Control(os.path.abspath(args.control))
    control.refresh()
    operations = FaultyOperations(os.path.abspath(args.backing), control)
    options = set(pyfuse3.default_options)
    options.add(f"fsname=faultyfs:{os.path.abspath(args.backing)}")
    options.add("subtype=faultyfs")
    pyfuse3.init(operations, args.mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
