"""Listing the datadirs: the names of their regular files, several datadirs at once.

Listing a large directory is mostly the backing filesystem's ``getdents64``
(tmpfs: 0.3 µs a name, 33 ms for 100,000 names). ``os.scandir`` gives up
the GIL around every single entry and takes it back to build a ``DirEntry``,
so two datadirs listed on two threads mostly wait for each other: 50,000
names in each of two datadirs take 45 ms one after the other, 31 to 39 ms
side by side. So a datadir is read here with ``getdents64`` itself, through
ctypes, a megabyte at a time: the kernel's part runs without the GIL, truly
side by side with the other datadirs' (27 ms for the same two), and the
entries are taken apart afterwards with a handful of copies per run of
same-sized entries rather than Python code per name.

The kernel's ``struct linux_dirent64`` is ``d_ino`` (8 bytes), ``d_off``
(8), ``d_reclen`` (2), ``d_type`` (1), then the name, a NUL and padding to a
multiple of 8; the kernel leaves the padding as it found it, and the buffer
is zeroed before each call. Entries of one size are laid out at a fixed
stride, so their sizes and types are read as strided columns, and their name
areas are copied out as columns of 8-byte words into slots separated by
zeros: splitting that at the NULs gives the names. Entries without a type
(``DT_UNKNOWN``, from filesystems that do not record it) and names of so
many lengths that the runs are short go the slow way: the whole directory
through ``os.scandir`` if the first read shows them, a later read one entry
at a time. So does everything on a C library without ``getdents64``.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Enough to list every datadir of a large pool at once; threads start only
# when a listing needs them.
_MAX_WORKERS = 8
_LARGE_DIRECTORY = 64 << 10  # bytes of st_size: a few thousand entries
_BUFFER_SIZE = 1 << 20
# The first read of a directory is small: if its names turn out to be of too
# many lengths, little of the kernel's work is thrown away.
_FIRST_READ_SIZE = 64 << 10
# The name areas are copied out in 8-byte words that start 3 bytes before an
# entry's name; the last one reaches 3 bytes into the next entry.
_SLACK = 8
_NAME_START = 19
_OVERREACH = 3
_DT_UNKNOWN = 0
_DT_REG = 8
# Below this many entries a run on average (judged after the first runs),
# taking runs apart costs more than os.scandir does per entry.
_SHORTEST_AVERAGE_RUN = 64
_RUNS_BEFORE_JUDGING = 8

_libc = ctypes.CDLL(None, use_errno=True)
_getdents64 = getattr(_libc, "getdents64", None)  # glibc 2.30 and later
if _getdents64 is not None:
    _getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    _getdents64.restype = ctypes.c_ssize_t


class _Unexpected(Exception):
    """Entries the column copies do not take apart: read them one by one."""


def scandir_regular_files(path: str) -> list[bytes]:
    """The names of the regular files in ``path`` (not following symlinks), by os.scandir."""
    with os.scandir(os.fsencode(path)) as entries:
        return [entry.name for entry in entries if entry.is_file(follow_symlinks=False)]


class _Buffer(threading.local):
    """One zeroed getdents64 buffer per thread, of pages of its own.

    Its own mapping, not the heap: between listings its pages are handed
    back (``release``), and the kernel gives them back zeroed when they are
    touched again. A heap buffer would keep a megabyte per lister thread.
    """

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, _BUFFER_SIZE + _SLACK)
        self.view = memoryview(self.memory)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))

    def release(self) -> None:
        self.memory.madvise(mmap.MADV_DONTNEED)


_buffers = _Buffer()


def regular_files(path: str) -> list[bytes]:
    """The names of the regular files in ``path`` (not following symlinks)."""
    return list(itertools.chain.from_iterable(regular_file_batches(path)))


def regular_file_batches(path: str) -> Iterator[list[bytes]]:
    """The names of the regular files in ``path``, a read (about 18,000 names) at a time.

    For a caller that keeps something smaller than the names (the name
    index keeps their hashes): a million names as bytes objects take 80 MiB,
    and Python keeps much of that memory once they are freed, while one
    read's worth is freed and allocated again in the same place.

    The first read is small: if it shows names of many lengths or entries
    without a type, little is lost in reading the directory with
    ``os.scandir`` instead.
    """
    if _getdents64 is None:
        yield scandir_regular_files(path)
        return
    directory = os.fsencode(path)
    buffer = _buffers  # this thread's
    first = True
    read_size = _FIRST_READ_SIZE
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while (size := _getdents64(fd, buffer.address, read_size)) > 0:
            batch = _take_apart(buffer, size, directory, give_up=first)
            if batch is None:
                yield scandir_regular_files(path)
                return
            yield batch
            first = False
            read_size = _BUFFER_SIZE
        if size < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)
        buffer.release()


def _take_apart(buffer: _Buffer, size: int, directory: bytes, give_up: bool) -> list[bytes] | None:
    """The regular files' names in a read of ``size`` bytes; None if ``give_up``
    and the column copies cannot do it. Leaves the buffer zeroed."""
    try:
        return _regular_names(buffer.view, size)
    except _Unexpected:
        return None if give_up else _regular_names_one_by_one(buffer.view, size, directory)
    finally:
        ctypes.memset(buffer.address, 0, size)


def _regular_names_one_by_one(view: memoryview, size: int, directory: bytes) -> list[bytes]:
    """The regular files' names among the entries in ``view[:size]``, in Python.

    For a later read that the column copies leave (names of many lengths,
    entries without a type, which are looked at with ``lstat``).
    """
    names = []
    position = 0
    while position < size:
        entry_size = int.from_bytes(view[position + 16 : position + 18], sys.byteorder)
        if entry_size <= _NAME_START:
            raise OSError(errno.EIO, f"malformed directory entry at byte {position}", directory)
        kind = view[position + 18]
        name = bytes(view[position + _NAME_START : position + entry_size]).split(b"\0", 1)[0]
        if kind == _DT_REG or (kind == _DT_UNKNOWN and _is_regular_file(directory, name)):
            names.append(name)
        position += entry_size
    return names


def _is_regular_file(directory: bytes, name: bytes) -> bool:
    try:
        return stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode)
    except FileNotFoundError:
        return False


def _regular_names(view: memoryview, size: int) -> list[bytes]:
    """The regular files' names among the entries in ``view[:size]``, by column copies."""
    names: list[bytes] = []
    position = runs = entries = 0
    while position < size:
        entry_size = int.from_bytes(view[position + 16 : position + 18], sys.byteorder)
        if entry_size < 24 or entry_size % 8 or position + entry_size > size:
            raise _Unexpected
        count = _run_length(view, position, size, entry_size)
        end = position + count * entry_size
        run_names = _names_in_run(view, position, count, entry_size)
        types = bytes(view[position + 18 : end : entry_size])
        if types.count(_DT_REG) == count:
            names += run_names
        elif _DT_UNKNOWN in types:
            raise _Unexpected
        else:
            names += itertools.compress(run_names, map(_DT_REG.__eq__, types))
        position = end
        runs += 1
        entries += count
        if runs > _RUNS_BEFORE_JUDGING and runs * _SHORTEST_AVERAGE_RUN > entries:
            raise _Unexpected
    return names


def _run_length(view: memoryview, position: int, size: int, entry_size: int) -> int:
    """How many entries from ``position`` on have the size ``entry_size``.

    If they all do, their ``d_reclen`` fields lie ``entry_size`` apart: read
    that column (in growing windows, so a short run costs little) up to the
    first entry that differs.
    """
    window = 64
    while True:
        end = min(size, position + window * entry_size)
        low = bytes(view[position + 16 : end : entry_size])
        high = bytes(view[position + 17 : end : entry_size])
        count = min(
            len(low) - len(low.lstrip(low[:1])),
            len(high) - len(high.lstrip(high[:1])),
        )
        if count < len(low) or end == size:
            return count
        window *= 8


def _names_in_run(view: memoryview, position: int, count: int, entry_size: int) -> list[bytes]:
    """The names of ``count`` entries of ``entry_size`` bytes from ``position`` on."""
    # Seen 3 bytes early, an entry's name area starts at its third 8-byte
    # word: copy words 2 on of every entry into one slot each.
    words_per_entry = entry_size // 8
    slot_words = words_per_entry - 2
    slot_size = slot_words * 8
    frame = view[position + _OVERREACH : position + _OVERREACH + count * entry_size].cast("Q")
    slots = bytearray(count * slot_size)
    slot_view = memoryview(slots).cast("Q")
    for word in range(slot_words):
        slot_view[word::slot_words] = frame[2 + word :: words_per_entry]
    # The last word of a slot holds the next entry's first bytes: clear them.
    zeros = bytes(count)
    for offset in range(slot_size - _OVERREACH, slot_size):
        slots[offset::slot_size] = zeros
    names = list(filter(None, bytes(slots).split(b"\0")))
    if len(names) != count:
        raise _Unexpected
    return names


def is_large(path: str) -> bool:
    """Whether reading ``path`` on a worker, beside other directories, pays.

    A directory's size grows with its entries (tmpfs: 20 bytes each; ext4,
    xfs: blocks of entries; btrfs: their names): a small one is read sooner
    than a worker thread wakes up.
    """
    try:
        return os.stat(path).st_size >= _LARGE_DIRECTORY
    except OSError:
        return False


def regular_files_or_error(path: str) -> list[bytes] | OSError:
    """``regular_files(path)``, or the OSError it raised (for a worker to hand back)."""
    try:
        return regular_files(path)
    except OSError as exc:
        return exc


class DatadirLister:
    """Worker threads for reading datadirs side by side.

    Requests are answered on threads pinned to one CPU each (``fusestore/fuse/uring.py``), and
    a thread starts with its creator's CPUs: the workers take back the CPUs the
    daemon had when the lister was made, or they would all share one.
    """

    def __init__(self) -> None:
        self._cpus = os.sched_getaffinity(0)
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, work: Callable[..., T], *args: object) -> Future[T]:
        """Run ``work`` on a worker; work submitted earlier starts first."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                _MAX_WORKERS, thread_name_prefix="fusestore-list", initializer=self._unpin
            )
        return self._executor.submit(work, *args)

    def _unpin(self) -> None:
        os.sched_setaffinity(0, self._cpus)

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
