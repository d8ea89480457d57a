"""READDIR replies (fusestore/fuse/dirents.py): what the kernel gets, read the way the kernel reads.

The kernel asks for entries after the ``off`` of the last entry it took, and
may take fewer entries than a reply holds; these tests read listings that
way, with replies parsed as ``struct fuse_dirent``.
"""

from __future__ import annotations

import errno
import random
import struct
import threading
import time
from queue import SimpleQueue

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


def read_all(listing: PackedListing, rng: random.Random) -> list[tuple[int, int, bytes]]:
    """Read to the end like the kernel: each time taking only some of the reply."""
    taken: list[tuple[int, int, bytes]] = []
    offset = 0
    while entries := parse(listing.chunk(offset, rng.choice([300, 4096, 1 << 20]))):
        taken += entries[: rng.randint(1, len(entries))]
        offset = taken[-1][1]
    return taken


def listing_of(parts: list[PackedPart], delay: float = 0) -> PackedListing:
    rest: SimpleQueue = SimpleQueue()

    def feed() -> None:
        for part in parts[1:]:
            time.sleep(delay)
            rest.put(part)
        rest.put(None)

    threading.Thread(target=feed, daemon=True).start()
    return PackedListing(parts[0], rest)


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
    entries = read_all(listing_of(parts, delay=rng.choice([0, 0.001])), rng)
    if dots is not None:
        assert [(ino, name) for ino, _, name in entries[:2]] == [(1, b"."), (1, b"..")]
        entries = entries[2:]
    assert sorted(name for _, _, name in entries) == sorted(names)
    assert len({off for _, off, _ in entries}) == len(entries)
    own = [ino for ino, _, name in entries if name not in known]
    assert all(ino >= OWN_INODES for ino in own)
    assert len(set(own)) == len(own)
    assert all(ino == known[name] for ino, _, name in entries if name in known)


def test_a_reply_never_waits_for_a_part_if_it_has_entries_already() -> None:
    rest: SimpleQueue = SimpleQueue()
    listing = PackedListing(PackedPart([b"first"], {}, 0), rest)
    first = parse(listing.chunk(0, 4096))
    assert [name for _, _, name in first] == [b"first"]
    threading.Timer(0.05, rest.put, [PackedPart([b"second"], {}, 1)]).start()
    started = time.monotonic()
    # Nothing left to answer with: waits for the next part.
    second = parse(listing.chunk(first[-1][1], 4096))
    assert time.monotonic() - started >= 0.04
    assert [name for _, _, name in second] == [b"second"]
    rest.put(None)
    assert parse(listing.chunk(second[-1][1], 4096)) == []


def test_a_failed_listing_answers_eio() -> None:
    rest: SimpleQueue = SimpleQueue()
    rest.put(RuntimeError("worker failed"))
    listing = PackedListing(PackedPart([b"only"], {}, 0), rest)
    (entry,) = parse(listing.chunk(0, 4096))
    with pytest.raises(OSError) as caught:
        listing.chunk(entry[1], 4096)
    assert caught.value.errno == errno.EIO


def test_100000_names_of_one_length_pack_into_one_run() -> None:
    names = [f"{index:08d}-0000-4000-8000-000000000000".encode() for index in range(100_000)]
    part = PackedPart(names, {}, 0)
    assert part.count == 100_000
    entries, taken = part.chunk(0, 1 << 20)
    assert taken == (1 << 20) // 64  # 24-byte head + 36-byte name, padded to 64
    assert [name for _, _, name in parse(entries)] == names[:taken]
