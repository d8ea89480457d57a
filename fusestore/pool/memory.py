"""The daemon's memory as the C library keeps it: few arenas, freed pages given back.

glibc gives each thread that allocates an arena of its own (up to eight per
CPU) and keeps the freed blocks of each. The daemon has a dozen threads
(probers, indexers, io_uring queues, the checksummer) and passes a million
names through them in a listing, so freed memory stayed spread over many
arenas: 75-90 MiB after listings of 1,000,000 names, against 54-56 MiB
with two arenas (measured, tmpfs, five listings; creates, stats and
unlinks at the same rates within this VM's noise). Python's own allocator
serves small objects under the interpreter lock anyway, so threads seldom
wait for an arena.
"""

from __future__ import annotations

import ctypes

_libc = ctypes.CDLL(None, use_errno=True)
_mallopt = getattr(_libc, "mallopt", None)  # glibc
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int

_M_ARENA_MAX = -8  # malloc.h
ARENAS = 2


def limit_arenas() -> None:
    """At most :data:`ARENAS` malloc arenas: call before starting threads."""
    if _mallopt is not None:
        _mallopt(_M_ARENA_MAX, ARENAS)


def give_back_memory() -> None:
    """Return the C library's free memory to the system, after a large listing.

    A listing of a million names allocates and frees some 200 MiB (names,
    sets, packed entries); glibc keeps freed blocks of one thread's arena
    and raises its threshold for giving large blocks their own mapping, so
    without this the daemon stays at its peak. ``malloc_trim`` gives back
    every free page, in a few milliseconds (without the GIL: ctypes drops it).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
