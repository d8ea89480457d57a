"""Spill-over: README "How it behaves", *Spill-over*.

A write that meets a full datadir moves the file, bytes and handles, to
another one; a file that fits nowhere fails with ENOSPC and leaves no bytes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountFactory,
    TmpfsFactory,
    dd,
    files_below,
    incoming_files,
    kept_files,
    used_bytes,
)
from tests.faulty import FaultyFactory


def test_48mib_write_spills_from_full_datadir_into_the_larger_one(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    small, large = Datadir(tmpfs("small", 32), 100), Datadir(tmpfs("large", 256), 50)
    mounted = mount_pool([small, large])
    source = tmp_path / "image"
    source.write_bytes(os.urandom(48 * MiB))
    result = dd(mounted.path("image"), 48, source=str(source))
    assert result.returncode == 0, result.stderr
    assert mounted.holders("image") == [large.path]
    assert (large.path / "image").read_bytes() == source.read_bytes()
    assert incoming_files(small) == [] and used_bytes(small) < MiB
    assert "moved 'image'" in mounted.log()


def test_write_that_fits_nowhere_fails_with_enospc_and_leaves_no_bytes(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, second = Datadir(tmpfs("small", 32), 100), Datadir(tmpfs("second", 40), 50)
    mounted = mount_pool([small, second])
    result = dd(mounted.path("image"), 48, source="/dev/zero")
    assert result.returncode != 0
    assert "No space left on device" in result.stderr
    assert mounted.holders("image") == []
    assert [incoming_files(d) for d in (small, second)] == [[], []]
    assert used_bytes(small) < MiB and used_bytes(second) < MiB
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path("image"))
    assert "removed incomplete new file 'image'" in mounted.log()


def test_every_open_handle_follows_the_file_when_it_moves(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 8), 100), Datadir(tmpfs("large", 64), 50)
    mounted = mount_pool([small, large])
    writer = os.open(mounted.path("moving"), os.O_CREAT | os.O_WRONLY, 0o644)
    reader = os.open(mounted.path("moving"), os.O_RDONLY)
    data = os.urandom(12 * MiB)
    try:
        os.write(writer, data[: 2 * MiB])
        assert os.pread(reader, 16, 0) == data[:16]
        os.write(writer, data[2 * MiB :])  # small fills up: the file moves to large
        assert os.pread(reader, 16, 10 * MiB) == data[10 * MiB : 10 * MiB + 16]
    finally:
        os.close(reader)
        os.close(writer)
    assert mounted.holders("moving") == [large.path]
    assert (large.path / "moving").read_bytes() == data


def test_existing_file_grows_into_another_datadir(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 8), 100), Datadir(tmpfs("large", 64), 50)
    mounted = mount_pool([small, large])
    first = os.urandom(2 * MiB)
    mounted.path("log").write_bytes(first)
    assert mounted.holders("log") == [small.path]
    more = os.urandom(10 * MiB)
    with open(mounted.path("log"), "ab") as f:
        f.write(more)
    assert mounted.holders("log") == [large.path]
    assert mounted.path("log").read_bytes() == first + more


def test_efbig_from_the_datadir_moves_the_file_too(
    faulty_datadir: FaultyFactory, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """EFBIG (the file is too large for that filesystem) is "no room here" as
    ENOSPC is: the file moves on, the writer notices nothing."""
    faulty = faulty_datadir("limited", 64)
    roomy = Datadir(tmpfs("roomy", 64), 1)
    mounted = mount_pool([Datadir(faulty.path, 2), roomy])
    data = os.urandom(3 * MiB)
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data[: 1 * MiB])
        faulty.fail("write", ".fusestore/incoming/*", "EFBIG")
        os.write(fd, data[1 * MiB :])
    finally:
        os.close(fd)
    assert mounted.holders("image") == [roomy.path]
    assert (roomy.path / "image").read_bytes() == data
    assert files_below(faulty.backing) == {}  # nothing left behind, private area included
    assert "moved 'image'" in mounted.log()


def test_the_file_moves_to_the_best_datadir_that_can_hold_it_plus_the_write(
    faulty_datadir: FaultyFactory, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """The target is chosen as a new file's datadir is (highest priority, then
    most free space), among those that can hold the bytes so far *plus* the
    write: a datadir with room for the first but not for both is passed over."""
    faulty = faulty_datadir("full", 64)
    # 2.5 MiB free: room for the 2 MiB written so far, not for them plus the
    # next write (a request of up to 1 MiB).
    cramped = Datadir(tmpfs("cramped", 4), 90)
    filler = os.urandom(3 * MiB // 2)
    (cramped.path / "filler").write_bytes(filler)
    roomy = Datadir(tmpfs("roomy", 16), 50)
    roomiest = Datadir(tmpfs("roomiest", 24), 50)  # most free space of its priority: chosen
    huge = Datadir(tmpfs("huge", 64), 10)  # the most free space, but a lower priority
    mounted = mount_pool([Datadir(faulty.path, 100), cramped, roomy, roomiest, huge])
    data = os.urandom(3 * MiB)
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, data[: 2 * MiB]) == 2 * MiB
        faulty.fail("write", ".fusestore/incoming/*", "ENOSPC")
        assert os.write(fd, data[2 * MiB :]) == MiB
    finally:
        os.close(fd)
    assert mounted.holders("image") == [roomiest.path]
    assert (roomiest.path / "image").read_bytes() == data
    assert files_below(cramped.path) == {"filler": filler}  # private area included
    for untouched in (faulty.backing, roomy.path, huge.path):
        assert files_below(untouched) == {}, untouched
    moved = f"moved 'image' ({2 * MiB} bytes) from full datadir {faulty.path} to {roomiest.path}"
    assert moved in mounted.log()


def test_an_existing_file_whose_rewrite_fits_nowhere_keeps_its_name(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """README *Failed writes*: existing files are never removed on a write error,
    even when the write meets ENOSPC in every datadir."""
    top, other = Datadir(tmpfs("top", 8), 100), Datadir(tmpfs("other", 6), 50)
    mounted = mount_pool([top, other])
    mounted.path("image").write_bytes(b"old contents")
    assert mounted.holders("image") == [top.path]
    data = os.urandom(16 * MiB)
    fd = os.open(mounted.path("image"), os.O_WRONLY | os.O_TRUNC)
    try:
        written = 0
        with pytest.raises(OSError) as caught:
            while written < len(data):
                written += os.write(fd, data[written : written + MiB])
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert mounted.holders("image") == [top.path]
    remaining = (top.path / "image").read_bytes()
    assert 0 < len(remaining) < len(data)
    assert remaining == data[: len(remaining)]  # what fitted, in place
    assert mounted.path("image").read_bytes() == remaining
    assert files_below(other.path) == {}
    assert [incoming_files(d) for d in (top, other)] == [[], []]
    assert [kept_files(d) for d in (top, other)] == [[], []]
