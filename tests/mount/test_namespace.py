"""One flat namespace over the datadirs: README "How it behaves", *One flat directory*,
*Duplicates*, *Rename*, and *No state but the datadirs* (changes made directly
in a datadir show within 1 second; a listing is a snapshot)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    open_path_to,
    run_as_nobody,
)

# README, "No state but the datadirs": a change made directly in a datadir
# shows through the mount within 1 second (the kernel's cache timeouts,
# fusestore.fuse.handlers ENTRY_TIMEOUT / ATTR_TIMEOUT / NEGATIVE_TIMEOUT),
# checked with half a second to spare for scheduling.
PROMISED_SECONDS = 1.0
VISIBLE_WITHIN = PROMISED_SECONDS + 0.5


@pytest.fixture
def three(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """Priorities 30, 20, 10, each 16 MiB."""
    datadirs = [Datadir(tmpfs(f"p{p}", 16), p) for p in (30, 20, 10)]
    return mount_pool(datadirs)


def put(datadir: Datadir, name: str, data: bytes) -> Path:
    path = datadir.path / name
    path.write_bytes(data)
    return path


def seconds_until(condition, since: float, limit: float = VISIBLE_WITHIN) -> float:
    """Seconds from ``since`` until ``condition()`` first held; fails if not within ``limit``."""
    while not condition():
        if time.monotonic() - since > limit:
            raise AssertionError(f"not within {limit} s")
        time.sleep(0.01)
    return time.monotonic() - since


def test_duplicate_name_reads_from_highest_priority(three: MountedPool) -> None:
    top, middle, low = three.datadirs
    put(low, "dup", b"low")
    put(top, "dup", b"top")
    put(middle, "dup", b"middle")
    assert three.path("dup").read_bytes() == b"top"
    assert os.listdir(three.mountpoint) == ["dup"]


def test_file_in_a_lower_datadir_is_found(three: MountedPool) -> None:
    put(three.datadirs[2], "only-low", b"data")
    assert three.path("only-low").read_bytes() == b"data"


def test_missing_name_is_enoent(three: MountedPool) -> None:
    assert errno_of(os.stat, three.path("absent")) == errno.ENOENT
    assert errno_of(os.open, three.path("absent"), os.O_RDONLY) == errno.ENOENT


def test_symlinks_directories_and_sockets_are_invisible_and_skipped_by_lookups(
    three: MountedPool, tmp_path: Path
) -> None:
    top, _middle, low = three.datadirs
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the pool")
    (top.path / "link").symlink_to(secret)
    (top.path / "subdir").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(top.path / "sock"))
    os.mkfifo(top.path / "fifo")
    put(low, "link", b"real file below the symlink")
    try:
        assert sorted(os.listdir(three.mountpoint)) == ["link"]
        # The symlink in the top datadir is skipped, not followed.
        assert three.path("link").read_bytes() == b"real file below the symlink"
        for hidden in ("subdir", "sock", "fifo"):
            assert errno_of(os.stat, three.path(hidden)) == errno.ENOENT
    finally:
        server.close()


def test_a_symlink_swapped_in_under_an_open_file_is_not_followed(
    three: MountedPool, tmp_path: Path
) -> None:
    """Backing files are opened O_NOFOLLOW: a symlink put in place of a file
    between its lookup and an open (here: while the file is open, so the pool
    opens the backing path it already knows) makes the open fail with ELOOP,
    and never opens the symlink's target."""
    top = three.datadirs[0]
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the pool")
    put(top, "victim", b"the pool's file")
    reader = os.open(three.path("victim"), os.O_RDONLY)
    try:
        swap = top.path / "swap"
        swap.symlink_to(secret)
        swap.rename(top.path / "victim")  # atomically: the name is now the symlink
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            assert errno_of(os.open, three.path("victim"), flags) == errno.ELOOP
        assert os.pread(reader, 100, 0) == b"the pool's file"  # the open file is unchanged
    finally:
        os.close(reader)
    assert secret.read_bytes() == b"outside the pool"
    assert (top.path / "victim").is_symlink()


def test_readdir_lists_each_name_once(three: MountedPool) -> None:
    top, middle, low = three.datadirs
    for datadir in (top, middle, low):
        put(datadir, "everywhere", datadir.path.name.encode())
    put(middle, "middle-only", b"m")
    put(low, "low-only", b"l")
    names = os.listdir(three.mountpoint)
    assert sorted(names) == ["everywhere", "low-only", "middle-only"]
    listed = subprocess.run(
        ["ls", "-l", str(three.mountpoint)], capture_output=True, text=True, check=True
    ).stdout
    assert listed.count("everywhere") == 1


def test_readdir_of_100000_names_lists_each_once_in_several_requests(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    a = Datadir(tmpfs("a", 64), 2)
    b = Datadir(tmpfs("b", 64), 1)
    for i in range(50_000):
        (a.path / f"a{i:06d}").touch()
        (b.path / f"b{i:06d}").touch()
    for i in range(1000):  # duplicates are still listed once
        (b.path / f"a{i:06d}").touch()
    mounted = mount_pool([a, b], "--debug")
    names = os.listdir(mounted.mountpoint)
    assert len(names) == 100_000
    assert set(names) == {f"{d}{i:06d}" for d in "ab" for i in range(50_000)}
    # One opendir, answered in several READDIR requests from one snapshot
    # (test_a_listing_is_a_snapshot_that_changes_during_the_reading_do_not_reach).
    log = mounted.log()
    assert log.count("DEBUG opendir(") == 1
    assert log.count("DEBUG readdir(") > 1


class OpenDirectory:
    """A directory opened with open(2) (the kernel's opendir) and read with
    getdents64, ``buffer_size`` bytes per call, when the test says."""

    def __init__(self, directory: Path, buffer_size: int = 4096) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._buffer = ctypes.create_string_buffer(buffer_size)
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)

    def read(self) -> list[str] | None:
        """The names of one getdents64 call (without . and ..); None at the end."""
        size = self._libc.getdents64(self.fd, self._buffer, len(self._buffer))
        if size < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        if size == 0:
            return None
        data = self._buffer.raw[:size]
        names = []
        position = 0
        while position < size:
            length = int.from_bytes(data[position + 16 : position + 18], "little")
            name = data[position + 19 : position + length].split(b"\0", 1)[0]
            if name not in (b".", b".."):
                names.append(os.fsdecode(name))
            position += length
        return names

    def rest(self) -> list[str]:
        names: list[str] = []
        while (more := self.read()) is not None:
            names += more
        return names

    def close(self) -> None:
        os.close(self.fd)


def getdents_names(directory: Path, buffer_size: int) -> list[str]:
    """Names as getdents64 returns them, read ``buffer_size`` bytes at a time."""
    listing = OpenDirectory(directory, buffer_size)
    try:
        return listing.rest()
    finally:
        listing.close()


def test_readdir_read_in_small_pieces_across_datadirs(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    a = Datadir(tmpfs("a", 16), 2)
    b = Datadir(tmpfs("b", 16), 1)
    expected = set()
    for i in range(3000):
        for datadir, prefix in ((a, "a"), (b, "b")):
            (datadir.path / f"{prefix}-{i}").touch()
            expected.add(f"{prefix}-{i}")
    for i in range(0, 3000, 30):
        (b.path / f"a-{i}").touch()  # duplicates are listed once
    mounted = mount_pool([a, b])
    # 4 KiB at a time: dozens of READDIR requests, resumed at every offset
    # the kernel hands back, across the datadirs' parts of the listing.
    names = getdents_names(mounted.mountpoint, 4096)
    assert sorted(names) == sorted(expected)


def _entries_with_offsets(fd: int, buffer_size: int) -> list[tuple[str, int]]:
    """(name, d_off) of every entry getdents64 returns from ``fd``'s position on."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(buffer_size)
    entries = []
    while (size := libc.getdents64(fd, buffer, buffer_size)) > 0:
        data = buffer.raw[:size]
        position = 0
        while position < size:
            offset = int.from_bytes(data[position + 8 : position + 16], "little", signed=True)
            length = int.from_bytes(data[position + 16 : position + 18], "little")
            name = data[position + 19 : position + length].split(b"\0", 1)[0]
            entries.append((os.fsdecode(name), offset))
            position += length
    assert size == 0, os.strerror(ctypes.get_errno())
    return entries


def test_a_listing_across_three_datadirs_resumes_seeks_and_rewinds_exactly_once(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadirs = [
        Datadir(tmpfs(name, 16), priority) for name, priority in (("a", 3), ("b", 2), ("c", 1))
    ]
    expected = {".", ".."}
    for index, datadir in enumerate(datadirs):
        for i in range(1500):
            (datadir.path / f"{'abc'[index]}-{i:05d}").touch()
            expected.add(f"{'abc'[index]}-{i:05d}")
    for i in range(0, 1500, 7):  # names in two datadirs, and in all three
        (datadirs[2].path / f"b-{i:05d}").touch()
        (datadirs[2].path / f"a-{i:05d}").touch()
        (datadirs[1].path / f"a-{i:05d}").touch()
    mounted = mount_pool(datadirs)
    fd = os.open(mounted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # 1 KiB a call: a hundred READDIR requests, each resumed at the last
        # offset the kernel took, across the three datadirs' parts.
        entries = _entries_with_offsets(fd, 1024)
        names = [name for name, _ in entries]
        assert len(names) == len(set(names)) and set(names) == expected
        # seekdir: from an entry's offset on, the entries after it, again.
        middle = len(entries) // 2
        os.lseek(fd, entries[middle][1], os.SEEK_SET)
        assert _entries_with_offsets(fd, 1024) == entries[middle + 1 :]
        # rewinddir: the whole listing again, every name once.
        os.lseek(fd, 0, os.SEEK_SET)
        again = [name for name, _ in _entries_with_offsets(fd, 4096)]
        assert sorted(again) == sorted(names)
    finally:
        os.close(fd)


def test_listed_inode_numbers_are_those_of_stat(three: MountedPool) -> None:
    top, middle, low = three.datadirs
    for datadir, name in ((top, "top"), (middle, "middle"), (low, "low"), (low, "unlooked")):
        put(datadir, name, b"x")
    looked_up = {name: os.stat(three.path(name)).st_ino for name in ("top", "middle", "low")}
    listed = {entry.name: entry.inode() for entry in os.scandir(three.mountpoint)}
    assert sorted(listed) == ["low", "middle", "top", "unlooked"]
    assert {name: listed[name] for name in looked_up} == looked_up
    assert len(set(listed.values())) == 4


def test_unlink_removes_every_copy(three: MountedPool) -> None:
    for datadir in three.datadirs:
        put(datadir, "image", b"copy")
    os.unlink(three.path("image"))
    assert three.holders("image") == []
    assert errno_of(os.stat, three.path("image")) == errno.ENOENT


def test_rm_of_missing_name_is_enoent(three: MountedPool) -> None:
    assert errno_of(os.unlink, three.path("ghost")) == errno.ENOENT


def test_rename_stays_in_source_datadir(three: MountedPool) -> None:
    _top, _middle, low = three.datadirs
    put(low, "old", b"payload")
    subprocess.run(["mv", str(three.path("old")), str(three.path("new"))], check=True)
    assert three.holders("new") == [low.path]
    assert three.holders("old") == []
    assert three.path("new").read_bytes() == b"payload"
    assert errno_of(os.stat, three.path("old")) == errno.ENOENT


def test_rename_onto_a_name_removes_its_copies_elsewhere(three: MountedPool) -> None:
    top, middle, low = three.datadirs
    put(middle, "source", b"new contents")
    put(top, "target", b"old top")
    put(low, "target", b"old low")
    os.rename(three.path("source"), three.path("target"))
    assert three.holders("target") == [middle.path]
    assert three.holders("source") == []
    assert three.path("target").read_bytes() == b"new contents"


def test_rename_moves_shadowed_copies_too_so_the_old_name_is_gone(three: MountedPool) -> None:
    top, _middle, low = three.datadirs
    put(top, "src", b"winner")
    put(low, "src", b"shadowed")
    os.rename(three.path("src"), three.path("dst"))
    assert errno_of(os.stat, three.path("src")) == errno.ENOENT
    assert three.path("dst").read_bytes() == b"winner"
    assert three.holders("dst") == [top.path, low.path]


def test_rename_of_missing_name_is_enoent(three: MountedPool) -> None:
    assert errno_of(os.rename, three.path("nope"), three.path("x")) == errno.ENOENT


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(old), at_fdcwd, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def test_rename_noreplace_refuses_existing_target(three: MountedPool) -> None:
    put(three.datadirs[0], "a", b"a")
    put(three.datadirs[2], "b", b"b")
    code = errno_of(renameat2, three.path("a"), three.path("b"), RENAME_NOREPLACE)
    assert code == errno.EEXIST
    assert three.path("a").read_bytes() == b"a"
    assert three.path("b").read_bytes() == b"b"
    renameat2(three.path("a"), three.path("c"), RENAME_NOREPLACE)
    assert three.holders("c") == [three.datadirs[0].path]


def test_rename_exchange_is_refused_without_changes(three: MountedPool) -> None:
    put(three.datadirs[0], "a", b"a")
    put(three.datadirs[0], "b", b"b")
    assert errno_of(renameat2, three.path("a"), three.path("b"), RENAME_EXCHANGE) == errno.EINVAL
    assert three.path("a").read_bytes() == b"a"


def test_open_file_follows_a_rename(three: MountedPool) -> None:
    fd = os.open(three.path("moving"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before ")
        os.rename(three.path("moving"), three.path("moved"))
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert three.path("moved").read_bytes() == b"before after"
    assert three.holders("moved") == [three.datadirs[0].path]


def test_unlinked_open_file_still_reads_and_writes(three: MountedPool) -> None:
    fd = os.open(three.path("temp"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"data")
        os.unlink(three.path("temp"))
        os.write(fd, b"+more")
        assert os.pread(fd, 100, 0) == b"data+more"
        assert os.fstat(fd).st_size == 9
    finally:
        os.close(fd)
    assert three.holders("temp") == []


@pytest.mark.parametrize(
    ("operation", "make_args"),
    [
        (os.mkdir, lambda m: (m / "dir",)),
        (os.symlink, lambda m: ("target", m / "sym")),
        (os.link, lambda m: (m / "file", m / "hard")),
        (os.mkfifo, lambda m: (m / "fifo",)),
        (os.mknod, lambda m: (m / "node",)),
    ],
    ids=["mkdir", "symlink", "link", "mkfifo", "mknod"],
)
def test_non_file_objects_are_refused_with_eperm(three: MountedPool, operation, make_args) -> None:
    put(three.datadirs[0], "file", b"x")
    assert errno_of(operation, *make_args(three.mountpoint)) == errno.EPERM
    assert sorted(os.listdir(three.mountpoint)) == ["file"]


def test_statfs_sums_distinct_filesystems(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> None:
    first = tmpfs("first", 32)
    second = tmpfs("second", 64)
    (first / "a").mkdir()
    (first / "b").mkdir()
    datadirs = [Datadir(first / "a", 3), Datadir(first / "b", 2), Datadir(second, 1)]
    mounted = mount_pool(datadirs)
    pool_vfs = os.statvfs(mounted.mountpoint)
    expected = sum(os.statvfs(p).f_blocks * os.statvfs(p).f_frsize for p in (first, second))
    assert pool_vfs.f_blocks * pool_vfs.f_frsize == expected
    available = sum(os.statvfs(p).f_bavail * os.statvfs(p).f_frsize for p in (first, second))
    assert abs(pool_vfs.f_bavail * pool_vfs.f_frsize - available) < 64 * 1024
    df = subprocess.run(
        ["df", "-B1", "--output=size", str(mounted.mountpoint)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert int(df[-1]) == expected


def test_file_added_directly_to_a_datadir_shows_within_one_second(three: MountedPool) -> None:
    assert errno_of(os.stat, three.path("late")) == errno.ENOENT  # now cached as absent
    put(three.datadirs[1], "late", b"arrived")
    added = time.monotonic()
    assert "late" in os.listdir(three.mountpoint)  # a new listing is taken now
    seconds_until(three.path("late").exists, since=added)
    assert three.path("late").read_bytes() == b"arrived"


def test_file_removed_directly_from_a_datadir_goes_within_one_second(three: MountedPool) -> None:
    backing = put(three.datadirs[2], "leaving", b"bye")
    assert three.path("leaving").read_bytes() == b"bye"  # now cached as there
    backing.unlink()
    removed = time.monotonic()
    assert "leaving" not in os.listdir(three.mountpoint)
    seconds_until(lambda: not three.path("leaving").exists(), since=removed)
    assert errno_of(os.open, three.path("leaving"), os.O_RDONLY) == errno.ENOENT


def snapshot_pool(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> tuple[MountedPool, set[str]]:
    """Two datadirs of 3,000 names each: a listing takes dozens of 4 KiB getdents64 calls."""
    a, b = Datadir(tmpfs("a", 16), 2), Datadir(tmpfs("b", 16), 1)
    for i in range(3000):
        (a.path / f"a-{i:04d}").touch()
        (b.path / f"b-{i:04d}").touch()
    return mount_pool([a, b]), {f"{d}-{i:04d}" for d in "ab" for i in range(3000)}


def change_datadirs(mounted: MountedPool, not_listed_yet: set[str]) -> str:
    """Directly in the datadirs, add ``added-to-a`` and ``added-to-b`` and
    remove a name of the second datadir not listed yet; that name."""
    a, b = mounted.datadirs
    removed = max(name for name in not_listed_yet if name.startswith("b-"))
    (b.path / removed).unlink()
    put(a, "added-to-a", b"new")
    put(b, "added-to-b", b"new")
    return removed


def test_a_listing_is_a_snapshot_that_changes_made_while_reading_do_not_reach(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted, before = snapshot_pool(tmpfs, mount_pool)
    listing = OpenDirectory(mounted.mountpoint)
    try:
        first = listing.read()
        assert first and len(first) < 200  # a small part of the 6,000 names
        removed = change_datadirs(mounted, before - set(first))
        names = first + listing.rest()
    finally:
        listing.close()
    assert len(names) == len(before)
    assert set(names) == before  # the removed name still, no added one
    after = (before - {removed}) | {"added-to-a", "added-to-b"}
    assert sorted(getdents_names(mounted.mountpoint, 4096)) == sorted(after)


def test_new_files_belong_to_the_calling_user(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadir = Datadir(tmpfs("shared", 16), 0)
    os.chmod(datadir.path, 0o1777)
    mounted = mount_pool([datadir], "-o", "allow_other")
    open_path_to(mounted.mountpoint)
    target = mounted.path("users-file")
    result = run_as_nobody("sh", "-c", 'umask 027; echo hi > "$1"', "sh", str(target))
    assert result.returncode == 0, result.stderr
    backing = os.stat(datadir.path / "users-file")
    assert (backing.st_uid, backing.st_gid) == (65534, 65534)
    assert backing.st_mode & 0o777 == 0o640
    assert os.stat(target).st_uid == 65534
