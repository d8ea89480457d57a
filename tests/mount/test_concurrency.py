"""Many writers and readers at once: no corruption, no deadlock.

Readers check every read: what a file holds at any moment is bytes its
writers wrote, at their offsets, and nothing else. Where a test needs a
read at a given point of a write (half-way, after the end), writer and
reader hand over with a barrier, not by timing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory

WORKERS = 16
CHUNK = 64 * 1024
HANDOVER_SECONDS = 60  # a barrier that waits longer means a hang: fail instead


@pytest.fixture
def pool(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    # The top datadir is too small for all files: some spill over mid-write.
    return mount_pool([Datadir(tmpfs("top", 24), 10), Datadir(tmpfs("rest", 256), 5)])


def pattern(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


def pwrite_in_chunks(path: Path, data: bytes, start: int) -> None:
    """Write ``data`` at ``start`` through a descriptor of its own, a chunk at a time."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, len(data), CHUNK):
            os.pwrite(fd, data[offset : offset + CHUNK], start + offset)
    finally:
        os.close(fd)


def assert_written_or_not_yet(seen: bytes, expected: bytes) -> None:
    """Each byte of ``seen`` is the written one or still zero (a hole, or a
    write being copied in at that moment); nothing past ``expected``."""
    assert len(seen) <= len(expected)
    for offset in range(0, len(seen), CHUNK):
        got, want = seen[offset : offset + CHUNK], expected[offset : offset + CHUNK]
        if got == want or not any(got):
            continue
        wrong = [i for i, byte in enumerate(got) if byte not in (0, want[i])]
        assert not wrong, f"byte {offset + wrong[0]} is {got[wrong[0]]}, not 0 or {want[wrong[0]]}"


def handing_over(barrier: threading.Barrier):
    """Run ``work`` and break ``barrier`` if it fails, so that its partner fails too."""

    def run(work, *args) -> None:
        try:
            work(*args)
        except BaseException:
            barrier.abort()
            raise

    return run


def run_pairs(barriers: list[threading.Barrier], writer, reader) -> None:
    """``writer(i)`` and ``reader(i)`` for each pair i, all at once, each pair
    handing over at its barrier; fails with the first failure."""
    with ThreadPoolExecutor(max_workers=2 * len(barriers)) as executor:
        futures = [
            executor.submit(handing_over(barrier), work, index)
            for index, barrier in enumerate(barriers)
            for work in (writer, reader)
        ]
        for future in futures:
            future.result(timeout=90)


def test_sixteen_readers_each_see_exactly_what_their_writer_wrote_so_far(
    pool: MountedPool,
) -> None:
    size = 4 * MiB
    checkpoints = (MiB, 5 * MiB // 2, size)  # the last one after close()
    barriers = [threading.Barrier(2, timeout=HANDOVER_SECONDS) for _ in range(WORKERS)]

    def write(index: int) -> None:
        data = pattern(index, size)
        fd = os.open(pool.path(f"file-{index}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        written = 0
        try:
            for checkpoint in checkpoints[:-1]:
                while written < checkpoint:
                    written += os.write(fd, data[written : min(written + CHUNK, checkpoint)])
                barriers[index].wait()  # the reader reads now
                barriers[index].wait()  # and is done
            while written < size:
                written += os.write(fd, data[written : written + CHUNK])
        finally:
            os.close(fd)
        barriers[index].wait()

    def read(index: int) -> None:
        """The file, open for writing meanwhile, read by a new open and a kept one."""
        expected = pattern(index, size)
        barriers[index].wait()
        kept = os.open(pool.path(f"file-{index}"), os.O_RDONLY)
        try:
            for number, checkpoint in enumerate(checkpoints):
                if number:
                    barriers[index].wait()
                assert pool.path(f"file-{index}").read_bytes() == expected[:checkpoint]
                assert os.pread(kept, size + 1, 0) == expected[:checkpoint]
                if checkpoint < size:
                    barriers[index].wait()
        finally:
            os.close(kept)

    run_pairs(barriers, write, read)
    spilled = 0
    for index in range(WORKERS):
        assert pool.path(f"file-{index}").read_bytes() == pattern(index, size)
        (holder,) = pool.holders(f"file-{index}")
        assert (holder / f"file-{index}").read_bytes() == pattern(index, size)
        spilled += holder == pool.datadirs[1].path
    assert spilled > 0  # 64 MiB of files do not fit the 24 MiB top datadir


def test_sixteen_writers_and_readers_on_one_shared_file(pool: MountedPool) -> None:
    """Reader ``i`` reads region ``i`` while writer ``i`` writes it: half-way
    (the writer waits), then until the writer is done, then once more."""
    region = 1 * MiB
    pool.path("shared").write_bytes(b"")
    barriers = [threading.Barrier(2, timeout=HANDOVER_SECONDS) for _ in range(WORKERS)]
    done = [threading.Event() for _ in range(WORKERS)]

    def write_region(index: int) -> None:
        data = pattern(100 + index, region)
        start = index * region
        pwrite_in_chunks(pool.path("shared"), data[: region // 2], start)
        barriers[index].wait()  # the reader reads the half-written region
        barriers[index].wait()
        pwrite_in_chunks(pool.path("shared"), data[region // 2 :], start + region // 2)
        done[index].set()

    def read_region(index: int) -> None:
        expected = pattern(100 + index, region)
        fd = os.open(pool.path("shared"), os.O_RDONLY)
        try:
            barriers[index].wait()
            half = os.pread(fd, region, index * region)
            assert half[: region // 2] == expected[: region // 2]
            assert not any(half[region // 2 :])  # not written yet: a hole or the end
            barriers[index].wait()
            deadline = time.monotonic() + HANDOVER_SECONDS
            while not done[index].is_set():
                assert time.monotonic() < deadline, f"writer {index} never finished"
                assert_written_or_not_yet(os.pread(fd, region, index * region), expected)
            assert os.pread(fd, region, index * region) == expected
        finally:
            os.close(fd)

    run_pairs(barriers, write_region, read_region)
    data = pool.path("shared").read_bytes()
    assert len(data) == WORKERS * region
    for index in range(WORKERS):
        assert data[index * region : (index + 1) * region] == pattern(100 + index, region)


def test_overwrites_in_flight_while_the_file_moves_are_kept(pool: MountedPool) -> None:
    """Writes to one file overlap in the daemon; a move (its datadir filled
    up) must wait for the writes in flight, or those landing in the old copy
    after it was copied are lost.

    Eight threads overwrite their regions again and again, each pass with
    bytes of its own, from before a 12 MiB append pushes the file past its
    datadir until after that append returned, and the test checks that
    overwrites were under way while it ran. Each then stops after its current
    pass, which must be what its region holds."""
    region = 2 * MiB
    writers = WORKERS // 2
    base = writers * region  # 16 MiB: fits the 24 MiB top datadir
    pool.path("growing").write_bytes(bytes(base))
    assert pool.holders("growing") == [pool.datadirs[0].path]
    tail = pattern(999, 12 * MiB)  # pushes the file past the top datadir
    first_pass_done = threading.Barrier(writers + 1, timeout=HANDOVER_SECONDS)
    appended = threading.Event()
    last_pass = [0] * writers
    overwrites: list[list[tuple[float, float]]] = [[] for _ in range(writers)]  # (start, end)
    append_span: list[float] = []

    def seed(index: int, number: int) -> int:
        return 1000 * (index + 1) + number

    def overwrite(index: int) -> None:
        fd = os.open(pool.path("growing"), os.O_WRONLY)
        try:
            number = 0
            deadline = time.monotonic() + HANDOVER_SECONDS
            while number == 0 or not appended.is_set():
                assert time.monotonic() < deadline, "the append never finished"
                number += 1
                data = pattern(seed(index, number), region)
                for offset in range(0, region, CHUNK):
                    started = time.monotonic()
                    os.pwrite(fd, data[offset : offset + CHUNK], index * region + offset)
                    overwrites[index].append((started, time.monotonic()))
                if number == 1:
                    first_pass_done.wait()
            last_pass[index] = number
        finally:
            os.close(fd)

    def append() -> None:
        first_pass_done.wait()
        fd = os.open(pool.path("growing"), os.O_WRONLY)
        try:
            append_span.append(time.monotonic())
            assert os.pwrite(fd, tail, base) == len(tail)
            append_span.append(time.monotonic())
        finally:
            os.close(fd)
            appended.set()

    with ThreadPoolExecutor(max_workers=writers + 1) as executor:
        futures = [
            executor.submit(handing_over(first_pass_done), overwrite, i) for i in range(writers)
        ]
        futures.append(executor.submit(handing_over(first_pass_done), append))
        for future in futures:
            future.result(timeout=90)
    # Which overwrites were under way while the append (and so the move) was.
    append_start, append_end = append_span
    overlapping = [
        sum(start < append_end and end > append_start for start, end in spans)
        for spans in overwrites
    ]
    assert sum(overlapping) > 0, "no overwrite was under way during the append"
    data = pool.path("growing").read_bytes()
    assert len(data) == base + len(tail)
    for index in range(writers):
        expected = pattern(seed(index, last_pass[index]), region)
        assert data[index * region : (index + 1) * region] == expected, index
    assert data[base:] == tail
    rest = pool.datadirs[1]
    assert pool.holders("growing") == [rest.path]
    assert (rest.path / "growing").read_bytes() == data
    top = pool.datadirs[0]
    assert f"from full datadir {top.path} to {rest.path}" in pool.log()
