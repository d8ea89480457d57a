"""READDIR replies (fusestore/fuse/dirents.py): what the kernel gets, read the way the kernel reads.

The kernel asks for entries after the ``off`` of the last entry it took, and
may take fewer entries than a reply holds; these tests read listings that
way, with replies parsed as ``struct fuse_dirent``.

The parts of a listing after the first come through a queue that a worker
fills. Here that queue is scripted (:class:`ScriptedParts`): each part is
either there before the reader asks for it or arrives only once the reader
waits for it, chosen by the test, so that which replies wait is decided by
the test and not by thread timing.
"""

from __future__ import annotations

import errno
import random
import struct
from queue import Empty, SimpleQueue

import pytest

from fusestore.fuse.dirents import OWN_INODES, PackedListing, PackedPart

DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type
DT_DIR, DT_REG = 4, 8
DOTS = (b".", b"..")


def parse(reply: bytes | memoryview) -> list[tuple[int, int, bytes]]:
    """(ino, off, name) of every entry; checks type and zero padding."""
    data = bytes(reply)
    entries = []
    position = 0
    while position < len(data):
        ino, off, length, kind = DIRENT_HEAD.unpack_from(data, position)
        name_end = position + DIRENT_HEAD.size + length
        assert kind == (DT_DIR if data[position + DIRENT_HEAD.size : name_end] in DOTS else DT_REG)
        entry_end = position + -(-(DIRENT_HEAD.size + length) // 8) * 8
        assert data[name_end:entry_end] == bytes(entry_end - name_end)
        entries.append((ino, off, data[position + DIRENT_HEAD.size : name_end]))
        position = entry_end
    assert position == len(data)
    return entries


class ScriptedParts:
    """The rest of a listing (parts, then None), each either already there
    or arriving only when the reader waits for it.

    Duck-types the ``SimpleQueue`` a listing reads: ``get(block=False)``
    raises ``Empty`` while the next item has not arrived; ``get(block=True)``
    is the reader waiting, which a real queue would block on until the
    worker puts the item, and is recorded in ``waits``.
    """

    def __init__(self, items: list[PackedPart | BaseException | None], early: list[bool]) -> None:
        self._items = list(items)
        self._early = list(early)
        self.waits: list[PackedPart | BaseException | None] = []  # what each wait got

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        assert self._items, "read past the end of the listing"
        if not self._early[0]:
            if not block:
                raise Empty
            self.waits.append(self._items[0])
        self._early.pop(0)
        return self._items.pop(0)

    @property
    def left(self) -> int:
        return len(self._items)


def read_all(listing: PackedListing, rng: random.Random) -> list[tuple[int, int, bytes]]:
    """Read to the end like the kernel: each time taking only some of the reply."""
    taken: list[tuple[int, int, bytes]] = []
    offset = 0
    while entries := parse(listing.chunk(offset, rng.choice([300, 4096, 1 << 20]))):
        taken += entries[: rng.randint(1, len(entries))]
        offset = taken[-1][1]
    return taken


@pytest.mark.parametrize("seed", range(40))
def test_every_name_once_with_its_inode_however_the_listing_is_read(seed: int) -> None:
    rng = random.Random(seed)
    names = list(
        {
            bytes(rng.choice(b"abc\xff.-") for _ in range(rng.choice([36, rng.randint(1, 255)])))
            for _ in range(rng.randint(0, 400))
        }
        - set(DOTS)  # never the name of a regular file
    )
    cuts = sorted(rng.sample(range(len(names) + 1), k=min(len(names) + 1, rng.randint(0, 4))))
    part_names = [names[a:b] for a, b in zip([0, *cuts], [*cuts, len(names)], strict=True)]
    known = {name: rng.randint(2, 10_000) for name in rng.sample(names, rng.randint(0, len(names)))}
    dots = rng.choice([None, 1])
    parts = [
        PackedPart(each, known, index, dots_inode=dots if index == 0 else None)
        for index, each in enumerate(part_names)
    ]
    # Each later part (and the end) is either ready or still being packed.
    early = [rng.random() < 0.5 for _ in parts]
    rest = ScriptedParts([*parts[1:], None], early)
    entries = read_all(PackedListing(parts[0], rest), rng)
    assert rest.left == 0
    # Only what had not arrived was waited for, each exactly once.
    assert len(rest.waits) == early.count(False)
    if dots is not None:
        assert [(ino, name) for ino, _, name in entries[:2]] == [(1, b"."), (1, b"..")]
        entries = entries[2:]
    assert sorted(name for _, _, name in entries) == sorted(names)
    assert len({off for _, off, _ in entries}) == len(entries)
    own = [ino for ino, _, name in entries if name not in known]
    assert all(ino >= OWN_INODES for ino in own)
    assert len(set(own)) == len(own)
    assert all(ino == known[name] for ino, _, name in entries if name in known)


def test_a_reply_with_entries_already_does_not_wait_for_the_next_part() -> None:
    second = PackedPart([b"second"], {}, 1)
    rest = ScriptedParts([second, None], early=[False, False])
    listing = PackedListing(PackedPart([b"first"], {}, 0), rest)
    # The second part is still being packed: the reply is the first part alone.
    first = parse(listing.chunk(0, 4096))
    assert [name for _, _, name in first] == [b"first"]
    assert rest.waits == []
    # Nothing left to answer with: now the reply waits for the second part.
    assert [name for _, _, name in parse(listing.chunk(first[-1][1], 4096))] == [b"second"]
    assert rest.waits == [second]


def test_a_reply_takes_in_parts_that_are_ready_without_waiting() -> None:
    second, third = PackedPart([b"second"], {}, 1), PackedPart([b"third"], {}, 2)
    rest = ScriptedParts([second, third, None], early=[True, True, False])
    listing = PackedListing(PackedPart([b"first"], {}, 0), rest)
    entries = parse(listing.chunk(0, 4096))
    assert [name for _, _, name in entries] == [b"first", b"second", b"third"]
    assert rest.waits == []  # the end of the listing had not arrived: not waited for
    assert parse(listing.chunk(entries[-1][1], 4096)) == []
    assert rest.waits == [None]


def test_a_failed_listing_answers_eio_after_the_entries_before() -> None:
    rest: SimpleQueue = SimpleQueue()
    rest.put(RuntimeError("worker failed"))
    listing = PackedListing(PackedPart([b"only"], {}, 0), rest)
    (entry,) = parse(listing.chunk(0, 4096))
    assert entry[2] == b"only"
    with pytest.raises(OSError, match=r"listing failed: RuntimeError\('worker failed'\)") as caught:
        listing.chunk(entry[1], 4096)
    assert caught.value.errno == errno.EIO


def test_100000_names_of_one_length_pack_into_one_run() -> None:
    names = [f"{index:08d}-0000-4000-8000-000000000000".encode() for index in range(100_000)]
    part = PackedPart(names, {}, 0)
    assert part.count == 100_000
    entries, taken = part.chunk(0, 1 << 20)
    assert taken == (1 << 20) // 64  # 24-byte head + 36-byte name, padded to 64
    assert [name for _, _, name in parse(entries)] == names[:taken]
