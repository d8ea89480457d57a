"""Many writers and readers at once: no corruption, no deadlock."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory

WORKERS = 16
CHUNK = 64 * 1024


@pytest.fixture
def pool(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    # The top datadir is too small for all files: some spill over mid-write.
    return mount_pool([Datadir(tmpfs("top", 24), 10), Datadir(tmpfs("rest", 256), 5)])


def pattern(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


def pwrite_in_chunks(path: Path, data: bytes, start: int, pause: float = 0.0) -> None:
    """Write ``data`` at ``start`` through a descriptor of its own, a chunk at a time."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, len(data), CHUNK):
            os.pwrite(fd, data[offset : offset + CHUNK], start + offset)
            if pause:
                time.sleep(pause)
    finally:
        os.close(fd)


def test_sixteen_writers_and_readers_on_distinct_files(pool: MountedPool) -> None:
    size = 4 * MiB

    def write(index: int) -> None:
        data = pattern(index, size)
        fd = os.open(pool.path(f"file-{index}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            for offset in range(0, size, CHUNK):
                os.write(fd, data[offset : offset + CHUNK])
        finally:
            os.close(fd)

    def read_while_written(index: int) -> None:
        """Whatever part of the file exists must already be the right bytes."""
        expected = pattern(index, size)
        for _ in range(20):
            try:
                seen = pool.path(f"file-{index}").read_bytes()
            except FileNotFoundError:
                continue
            assert seen == expected[: len(seen)]

    with ThreadPoolExecutor(max_workers=2 * WORKERS) as executor:
        writers = [executor.submit(write, i) for i in range(WORKERS)]
        readers = [executor.submit(read_while_written, i) for i in range(WORKERS)]
        for future in writers + readers:
            future.result(timeout=90)
    for index in range(WORKERS):
        assert pool.path(f"file-{index}").read_bytes() == pattern(index, size)
        (holder,) = pool.holders(f"file-{index}")
        assert (holder / f"file-{index}").read_bytes() == pattern(index, size)


def test_sixteen_writers_and_readers_on_one_shared_file(pool: MountedPool) -> None:
    region = 1 * MiB
    pool.path("shared").write_bytes(b"")

    def write_region(index: int) -> None:
        pwrite_in_chunks(pool.path("shared"), pattern(100 + index, region), index * region)

    def read_regions(_: int) -> None:
        fd = os.open(pool.path("shared"), os.O_RDONLY)
        try:
            for _ in range(20):
                os.pread(fd, region, 0)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=2 * WORKERS) as executor:
        futures = [executor.submit(write_region, i) for i in range(WORKERS)]
        futures += [executor.submit(read_regions, i) for i in range(WORKERS)]
        for future in futures:
            future.result(timeout=90)
    data = pool.path("shared").read_bytes()
    assert len(data) == WORKERS * region
    for index in range(WORKERS):
        assert data[index * region : (index + 1) * region] == pattern(100 + index, region)


def test_overwrites_in_flight_while_the_file_moves_are_kept(pool: MountedPool) -> None:
    """Writes to one file overlap in the daemon; a move (its datadir filled
    up) must wait for the writes in flight, or those landing in the old copy
    after it was copied are lost."""
    region = 2 * MiB
    base = WORKERS * region // 2  # 16 MiB: fits the 24 MiB top datadir
    pool.path("growing").write_bytes(bytes(base))
    tail = pattern(999, 12 * MiB)  # pushes the file past the top datadir

    def overwrite(index: int) -> None:
        # Paced, so that writes are in flight all through the move.
        data = pattern(300 + index, region)
        pwrite_in_chunks(pool.path("growing"), data, index * region, pause=0.0005)

    def append() -> None:
        pwrite_in_chunks(pool.path("growing"), tail, base)

    writers = WORKERS // 2
    with ThreadPoolExecutor(max_workers=writers + 1) as executor:
        futures = [executor.submit(overwrite, i) for i in range(writers)]
        futures.append(executor.submit(append))
        for future in futures:
            future.result(timeout=90)
    data = pool.path("growing").read_bytes()
    assert len(data) == base + len(tail)
    for index in range(writers):
        assert data[index * region : (index + 1) * region] == pattern(300 + index, region), index
    assert data[base:] == tail
    rest = pool.datadirs[1]
    assert pool.holders("growing") == [rest.path]
