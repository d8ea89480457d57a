"""Checksums of pool files, kept with each file in its extended attributes.

Why on the file: a checksum kept anywhere else (a database, the daemon's
memory) is lost with a restart, a copy of the datadir or a second daemon on
shared storage, and goes stale the moment a file is renamed. An extended
attribute on the backing file moves with every ``rename`` and ``link`` and
is seen by every daemon that reads the datadir.

Each checksummed file carries one attribute, :data:`RECORD`, holding the
digests *and* the size and modification time (:class:`Stamp`) of the bytes
they were computed from, written in one ``setxattr`` so that no reader sees
digests without their stamp. A file changed afterwards — through the pool,
which drops the record when it opens a file for writing, or behind the
pool's back — no longer matches its stamp: it is *changed*, not corrupt, and
its record is ignored until it is checksummed again. :data:`VERIFIED` holds
the time of the last successful ``fusestore verify`` with the same stamp.

This module only reads, writes and computes; when to do it is decided by
``checksummer.py`` (the daemon) and ``fusestore/admin/verify.py`` (the scrub).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fusestore.pool.config import DEFAULT_CHECKSUMS as DEFAULT_ALGORITHMS
from fusestore.pool.config import parse_checksums as check_algorithms

# Every attribute of the pool's own starts with this; users cannot set them.
PREFIX = "user.fusestore."
RECORD = PREFIX + "checksums"
__all__ = ["DEFAULT_ALGORITHMS", "check_algorithms"]  # re-exported from config
VERIFIED = PREFIX + "verified"
CHUNK = 1 << 20
# Files up to this size are checksummed at once, in the request that
# published them: 64 KiB take about 120 µs to hash, less than handing the
# file to the checksum thread costs (measured: 150 µs of that thread's CPU
# per small file, and the request threads slowed by waiting for the
# interpreter lock it holds between its system calls).
AT_ONCE = 64 << 10

# Errors that mean "this filesystem keeps no user xattrs", not a failure.
NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


@dataclass(frozen=True)
class Stamp:
    """The size and modification time of the bytes a checksum belongs to."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns)

    def encode(self) -> str:
        return f"size={self.size} mtime_ns={self.mtime_ns}"


def unchanged(before: os.stat_result, now: os.stat_result) -> bool:
    """Same file, same bytes, same attributes (ctime moves with any change,
    an attribute or a checksum stored included)."""
    fields = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
    return all(getattr(before, f) == getattr(now, f) for f in fields)


@dataclass(frozen=True)
class Record:
    """A file's digests (algorithm -> lower-case hex) and the stamp they belong to."""

    stamp: Stamp
    digests: Mapping[str, str]

    def encode(self) -> bytes:
        digests = " ".join(f"{name}={value}" for name, value in self.digests.items())
        return f"{self.stamp.encode()} {digests}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Record | None:
        """The record, or None if it is not one (damaged or foreign)."""
        fields = _fields(raw)
        stamp = _stamp(fields)
        digests = {k: v for k, v in fields.items() if k not in ("size", "mtime_ns")}
        if stamp is None or not digests:
            return None
        return cls(stamp, digests)


def _fields(raw: bytes) -> dict[str, str]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return {}
    return dict(part.partition("=")[::2] for part in text.split())


def _stamp(fields: Mapping[str, str]) -> Stamp | None:
    try:
        return Stamp(int(fields["size"]), int(fields["mtime_ns"]))
    except (KeyError, ValueError):
        return None


Target = int | str  # a descriptor or a path (never followed if a symlink)


def no_follow(target: Target) -> dict[str, bool]:
    """``follow_symlinks=False`` for a path; a descriptor takes no such argument."""
    return {} if isinstance(target, int) else {"follow_symlinks": False}


def _get(target: Target, attribute: str) -> bytes | None:
    try:
        return os.getxattr(target, attribute, **no_follow(target))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *NO_XATTRS):
            return None
        raise


def read_record(target: Target) -> Record | None:
    """The record as stored, whether or not it still matches the file."""
    raw = _get(target, RECORD)
    return None if raw is None else Record.decode(raw)


def current_record(target: Target, st: os.stat_result) -> Record | None:
    """The record if it belongs to the file as it is now (``st``), else None."""
    record = read_record(target)
    if record is None or record.stamp != Stamp.of(st):
        return None
    return record


def write_record(target: Target, record: Record, new_file: bool = False) -> None:
    """Store a record, replacing the last one and its verify stamp (a file
    just written through the pool has neither: ``new_file`` spares a call)."""
    os.setxattr(target, RECORD, record.encode(), **no_follow(target))
    if not new_file:
        _remove(target, VERIFIED)


def drop(target: Target) -> None:
    """Forget the checksums: the file is about to change through the pool."""
    _remove(target, RECORD)
    _remove(target, VERIFIED)


def _remove(target: Target, attribute: str) -> None:
    try:
        os.removexattr(target, attribute, **no_follow(target))
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, *NO_XATTRS):
            raise


def restamp(target: Target, before: os.stat_result, after: os.stat_result) -> None:
    """Keep a current record current across a change of times alone (``touch``,
    ``rsync -t``): the bytes are the ones the digests were computed from."""
    record = current_record(target, before)
    if record is None or before.st_size != after.st_size:
        return
    verified = read_verified(target, before)
    write_record(target, Record(Stamp.of(after), record.digests))
    if verified is not None:
        write_verified(target, Stamp.of(after), verified)


def read_verified(target: Target, st: os.stat_result) -> str | None:
    """UTC time of the last successful verify of the file as it is now, or None."""
    raw = _get(target, VERIFIED)
    if raw is None:
        return None
    when, _, rest = raw.decode("ascii", errors="replace").partition(" ")
    if _stamp(_fields(rest.encode())) != Stamp.of(st):
        return None
    return when


def write_verified(target: Target, stamp: Stamp, when: str | None = None) -> None:
    """Note a successful verify of the bytes of ``stamp`` (now, unless ``when``)."""
    when = when or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.setxattr(target, VERIFIED, f"{when} {stamp.encode()}".encode(), **no_follow(target))


def open_to_read(path: str) -> int:
    """A descriptor to read a file for its checksums without changing its
    access time (``O_NOATIME``, where the caller may use it): a checksum is
    not a read by anyone, and ``atime`` is someone else's information."""
    # O_NONBLOCK: a fifo put in a file's place meanwhile must not hang the reader.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)  # not the owner, without CAP_FOWNER


def compute(
    fd: int,
    algorithms: Iterable[str],
    size: int,
    on_chunk: Callable[[int], bool | None] | None = None,
) -> dict[str, str] | None:
    """The digests of the first ``size`` bytes of ``fd``, read back from the file.

    ``on_chunk(bytes_read)`` is called after each chunk (progress, pacing);
    returning True stops early and makes this return None. A file that is
    shorter than ``size`` changed meanwhile: None too. hashlib releases the
    interpreter lock for buffers this large, so other threads go on.
    """
    hashers = {name: hashlib.new(name) for name in algorithms}
    # No larger than the file: zeroing a 1 MiB buffer costs more than hashing
    # a small file.
    buffer = bytearray(min(CHUNK, size))
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        wanted = min(CHUNK, size - offset)
        got = os.preadv(fd, [view[:wanted]], offset)
        if got == 0:
            return None
        for hasher in hashers.values():
            hasher.update(view[:got])
        offset += got
        if on_chunk is not None and on_chunk(got):
            return None
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def store_now(
    fd: int, algorithms: Iterable[str], new_file: bool = False, largest: int | None = None
) -> bool:
    """Checksum the file of ``fd`` and store the record, if it is no larger
    than ``largest`` and did not change meanwhile; whether it was stored."""
    before = os.fstat(fd)
    if largest is not None and before.st_size > largest:
        return False
    digests = compute(fd, algorithms, before.st_size)
    if digests is None or Stamp.of(os.fstat(fd)) != Stamp.of(before):
        return False
    write_record(fd, Record(Stamp.of(before), digests), new_file)
    return True


def supports_xattrs(directory: str) -> bool:
    """Whether files in ``directory`` can carry user extended attributes
    (a probe file is created, tagged and removed)."""
    probe = os.path.join(directory, f".fusestore-xattr-probe-{os.getpid()}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.setxattr(fd, PREFIX + "probe", b"1")
    except OSError as exc:
        if exc.errno in NO_XATTRS:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(probe)
    return True
