"""Sparse files: ``fallocate`` modes and writing zeros as holes.

Raw VM images are mostly holes. The pool answers ``lseek(SEEK_DATA/SEEK_HOLE)``
and ``fallocate`` from the backing file, and with ``thin_provisioning`` on
(as Glance's ``filesystem_thin_provisioning``) writes blocks of zeros to new
files as holes: a block beyond the end of the file is skipped (the file is
extended at the end, with a hole), one inside it is punched.

Python's ``os`` has ``posix_fallocate`` but not ``fallocate(2)`` with its
modes, so that one call goes through ``ctypes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

# linux/falloc.h
KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10
# The modes FUSE passes on (the kernel refuses others before asking).
SUPPORTED = KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE

# Zero blocks are looked for at this granularity: a multiple of every
# filesystem block size in use, small enough to find the holes of an image.
THIN_BLOCK = 64 * 1024
_ZEROS = bytes(THIN_BLOCK)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError with its errno (EOPNOTSUPP where the backing
    filesystem cannot do ``mode``)."""
    if mode & ~SUPPORTED:
        raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def allocates(mode: int) -> bool:
    """Whether ``mode`` asks for space (so ENOSPC may mean: move the file)."""
    return not mode & PUNCH_HOLE


def write_thin(fd: int, offset: int, data: memoryview) -> int:
    """Write ``data`` at ``offset``, leaving blocks of zeros as holes; its length.

    Zero blocks beyond the current end of the file are not written at all;
    inside it they are punched (they may hold data of an earlier write).
    Runs of other blocks go in one ``pwrite`` each.
    """
    size = os.fstat(fd).st_size
    end = offset + len(data)
    position = 0
    run_start: int | None = None
    while position < len(data):
        next_boundary = (offset + position) // THIN_BLOCK * THIN_BLOCK + THIN_BLOCK
        block_end = min(len(data), next_boundary - offset)
        block = data[position:block_end]
        if bytes(block) == _ZEROS[: len(block)]:
            if run_start is not None:
                _write_all(fd, data[run_start:position], offset + run_start)
                run_start = None
            if offset + position < size:
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset + position, len(block))
        elif run_start is None:
            run_start = position
        position = block_end
    if run_start is not None:
        _write_all(fd, data[run_start:], offset + run_start)
    if end > os.fstat(fd).st_size:
        os.ftruncate(fd, end)  # the zeros at the end, as a hole
    return len(data)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
