"""A listing as the kernel reads it: FUSE directory entries, packed once, served in chunks.

A listing is read in several READDIR requests (each as large as the kernel
can take), each one starting after the last entry the kernel took: the
entry's ``off``. So a listing is packed once, at the first request, and each
request is a slice of it. It is packed in parts, one per datadir: the first
part is answered as soon as it is ready, while (for a large listing) a
worker thread packs the others (``Pool.list_names``), so that the program
reading the listing and the daemon preparing the rest of it work at the
same time.

Packing entry by entry in Python (one ``struct.pack`` a name) costs more
than listing the datadirs did, so names are packed a run at a time: every
name of one length makes an entry of one size, and the entries of a run are
built as columns of 8-byte words (inode, offset, length and type, then the
name's words), each column one strided copy. Pool names are nearly always of
one length (Glance's are UUIDs), so a part is usually one run. 100,000 names
of 12 bytes pack in 9 ms instead of 12 (a cached ``struct`` per name length);
of 36 bytes (a UUID) in 13.5 ms either way, but without the other per-name
work the old packing did (the inode table asked name by name).

An entry's ``off`` is its part's number in the high bits and its position in
the part plus one below them. Its inode is the name's inode number where the
kernel holds one, so that ``d_ino`` agrees with ``st_ino``; any other name
gets a number of its own, from a range the inode table never hands out.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import struct
import sys
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from queue import Empty, SimpleQueue

from fusestore.fuse import protocol as p

_WORD = 8
POSITION_BITS = 40
# Numbers for names the kernel has not looked up: far above what the inode
# table counts up to, and a multiple of 2**32 (see _pack_run).
OWN_INODES = 1 << 48


@dataclass(frozen=True)
class _Run:
    """Consecutive entries whose names have the same length."""

    first_entry: int
    count: int
    entry_size: int
    first_byte: int


def _entry_size(name_length: int) -> int:
    return -(-(p.DIRENT_HEAD.size + name_length) // _WORD) * _WORD


def _pack_run(
    names: list[bytes], known_inodes: Mapping[bytes, int], part: int, first_entry: int
) -> bytearray:
    """The entries of ``names`` (all of one length) from position ``first_entry`` of ``part``."""
    count = len(names)
    name_length = len(names[0])
    entry_size = _entry_size(name_length)
    name_room = entry_size - p.DIRENT_HEAD.size
    stride = entry_size // _WORD
    packed = bytearray(count * entry_size)
    words = memoryview(packed).cast("Q")
    # Python turns each number into a machine word one at a time, and small
    # numbers cost a third of 64-bit ones: positions are made once, as the
    # low 32-bit halves of both the offsets and the own inode numbers, whose
    # high halves are the same for the whole run.
    halves = memoryview(packed).cast("I")
    low = 0 if sys.byteorder == "little" else 1
    positions = array("I", range(first_entry + 1, first_entry + count + 1))
    high = part << (POSITION_BITS - 32)
    halves[2 + low :: 2 * stride] = positions
    halves[3 - low :: 2 * stride] = array("I", [high]) * count
    if known_inodes:
        own = OWN_INODES + (high << 32) + first_entry + 1
        words[0::stride] = array("Q", map(known_inodes.get, names, range(own, own + count)))
    else:
        halves[low :: 2 * stride] = positions
        halves[1 - low :: 2 * stride] = array("I", [(OWN_INODES >> 32) + high]) * count
    (length_and_type,) = struct.unpack("=Q", struct.pack("=II", name_length, p.DT_REG))
    words[2::stride] = array("Q", [length_and_type]) * count
    padding = bytes(name_room - name_length)
    name_words = memoryview(padding.join([*names, b""])).cast("Q")
    name_stride = name_room // _WORD
    for word in range(name_stride):
        words[3 + word :: stride] = name_words[word::name_stride]
    return packed


def _by_length(names: list[bytes]) -> Iterator[list[bytes]]:
    """``names`` in runs of one length (sorting them only if there are several)."""
    if len(set(map(len, names))) == 1:
        yield names
    elif names:
        for _length, same_length in itertools.groupby(sorted(names, key=len), key=len):
            yield list(same_length)


def _dots(part: int, directory_inode: int) -> bytearray:
    """The entries ``.`` and ``..``, at positions 1 and 2 of ``part``."""
    packed = bytearray()
    for position, name in enumerate((b".", b".."), start=1):
        head = p.DIRENT_HEAD.pack(
            directory_inode, part << POSITION_BITS | position, len(name), p.DT_DIR
        )
        packed += head + name.ljust(_entry_size(len(name)) - len(head), b"\0")
    return packed


class PackedPart:
    """The READDIR entries of one part of a listing (names of regular files)."""

    def __init__(
        self,
        names: list[bytes],
        known_inodes: Mapping[bytes, int],
        part: int,
        dots_inode: int | None = None,
    ) -> None:
        """``known_inodes``: the inode numbers the kernel holds, by name.

        With ``dots_inode`` (the first part of a listing), the part starts
        with ``.`` and ``..``, both of that inode: the pool's root is the only
        directory, and what lies above the mount is the kernel's business.
        """
        if len(names) >= 1 << 32:
            raise ValueError(f"{len(names)} names are more than a part can number")
        runs: list[bytearray] = []
        self._runs: list[_Run] = []
        self.count = 0
        size = 0
        if dots_inode is not None:
            runs.append(_dots(part, dots_inode))
            self._runs.append(_Run(0, 2, _entry_size(2), 0))
            self.count, size = 2, len(runs[0])
        for run in _by_length(names):
            runs.append(_pack_run(run, known_inodes, part, self.count))
            self._runs.append(_Run(self.count, len(run), _entry_size(len(run[0])), size))
            self.count += len(run)
            size += len(runs[-1])
        self._packed = memoryview(runs[0] if len(runs) == 1 else b"".join(runs))
        self.size = len(self._packed)
        self._run_starts = [run.first_entry for run in self._runs]

    def chunk(self, position: int, size: int) -> tuple[memoryview, int]:
        """The entries from ``position`` on that fit in ``size`` bytes, and how many."""
        index = bisect.bisect_right(self._run_starts, position) - 1
        if position >= self.count or index < 0:
            return memoryview(b""), 0
        run = self._runs[index]
        start = end = run.first_byte + (position - run.first_entry) * run.entry_size
        room = size
        taken = 0
        for run in self._runs[index:]:
            left = run.first_entry + run.count - position - taken
            fitting = min(left, room // run.entry_size)
            end += fitting * run.entry_size
            room -= fitting * run.entry_size
            taken += fitting
            if fitting < left:
                break
        return self._packed[start:end], taken


class PackedListing:
    """A snapshot of the pool's names, read in chunks: its first part, and the rest to come."""

    def __init__(self, first: PackedPart, rest: SimpleQueue[PackedPart | BaseException | None]):
        """``rest``: the other parts in order, then None (or an exception: the listing failed)."""
        self._parts = [first]
        self._rest = rest
        self._complete = False
        self._failure: BaseException | None = None

    @property
    def size(self) -> int:
        """Bytes of entries held (of the parts taken in so far)."""
        return sum(part.size for part in self._parts)

    def chunk(self, offset: int, size: int) -> bytes | memoryview:
        """The entries after the one whose ``off`` was ``offset`` (0: from the start).

        Waits for a part still being packed only if it has nothing else to
        answer with: the kernel asks again for the rest.
        """
        part, position = offset >> POSITION_BITS, offset & ((1 << POSITION_BITS) - 1)
        reply: list[memoryview] = []
        room = size
        while self._have(part, wait=room == size):
            entries, taken = self._parts[part].chunk(position, room)
            reply.append(entries)
            room -= len(entries)
            if position + taken < self._parts[part].count:
                break
            part += 1
            position = 0
        return reply[0] if len(reply) == 1 else b"".join(reply)

    def _have(self, part: int, wait: bool) -> bool:
        """Whether part ``part`` is in, taking in parts that are ready (or come, if ``wait``)."""
        while part >= len(self._parts):
            if not self._more(wait):
                return False
        return True

    def _more(self, wait: bool) -> bool:
        """Take in the next part, if there is one (and ``wait`` or it is ready).

        A failed listing ends with EIO, once the entries before are answered.
        """
        if not self._complete:
            try:
                item = self._rest.get(block=wait)
            except Empty:
                return False
            if isinstance(item, PackedPart):
                self._parts.append(item)
                return True
            self._complete = True
            self._failure = item
        if wait and self._failure is not None:
            raise OSError(errno.EIO, f"listing failed: {self._failure!r}") from self._failure
        return False
