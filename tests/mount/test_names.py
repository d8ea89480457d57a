"""Names the pool cannot hold are refused at once; its private area cannot be reached.

README "How it behaves" → *Names*: a name longer than 255 bytes fails with
ENAMETOOLONG at the request that carries it, before anything is written; the
private area's name ``.fusestore`` is not a pool file; a name taken in a
datadir by something the pool does not show sends a new file elsewhere.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable

import pytest

from tests.conftest import (
    Datadir,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    files_below,
    run_fusestore,
)
from tests.faulty import FaultyFactory


@pytest.fixture
def two(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """Priorities 2 and 1, 16 MiB each."""
    return mount_pool([Datadir(tmpfs("high", 16), 2), Datadir(tmpfs("low", 16), 1)])


def test_a_255_byte_name_works_end_to_end(two: MountedPool) -> None:
    name, other = "n" * 255, "é" * 127 + "x"  # 255 bytes, the second one in UTF-8
    assert len(other.encode()) == 255
    two.path(name).write_bytes(b"long-named image")
    assert two.holders(name) == [two.datadirs[0].path]
    assert os.stat(two.path(name)).st_size == 16
    assert name in os.listdir(two.mountpoint)
    os.rename(two.path(name), two.path(other))
    assert two.path(other).read_bytes() == b"long-named image"
    assert (two.datadirs[0].path / other).read_bytes() == b"long-named image"
    os.unlink(two.path(other))
    assert os.listdir(two.mountpoint) == []


@pytest.mark.parametrize("length", [256, 4000])
def test_a_longer_name_fails_at_once_and_leaves_nothing(two: MountedPool, length: int) -> None:
    long = str(two.path("l" * length))
    short = two.path("short")
    short.write_bytes(b"keep me")
    logged_before = len(two.log())
    calls: dict[str, Callable[[], object]] = {
        "open O_CREAT": lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        "open": lambda: os.open(long, os.O_RDONLY),
        "stat": lambda: os.stat(long),
        "unlink": lambda: os.unlink(long),
        "rename to it": lambda: os.rename(short, long),
        "rename from it": lambda: os.rename(long, short),
        "truncate": lambda: os.truncate(long, 0),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 0, 0),
        "link": lambda: os.link(short, long),
        "symlink": lambda: os.symlink("short", long),
        "mkdir": lambda: os.mkdir(long),
        "mkfifo": lambda: os.mkfifo(long),
    }
    errnos = {what: errno_of(call) for what, call in calls.items()}
    assert errnos == dict.fromkeys(calls, errno.ENAMETOOLONG)
    # Nothing written anywhere, the private area included; the other file untouched.
    assert files_below(two.datadirs[0].path) == {"short": b"keep me"}
    assert files_below(two.datadirs[1].path) == {}
    assert os.listdir(two.mountpoint) == ["short"]
    assert two.log()[logged_before:] == ""  # not even an INFO line


def test_data_that_loses_the_race_for_a_255_byte_name_is_kept(two: MountedPool) -> None:
    name = "r" * 255
    fd = os.open(two.path(name), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"mine")
    (two.datadirs[1].path / name).write_bytes(b"someone else's")
    assert errno_of(lambda: os.close(fd)) == errno.EEXIST
    kept = two.datadirs[0].path / ".fusestore" / "kept"
    (entry,) = kept.iterdir()
    assert entry.read_bytes() == b"mine"
    assert len(entry.name.encode()) <= 255 and entry.name.startswith("r" * 200)
    assert "could not be published" in two.log() and str(entry) in two.log()
    report = run_fusestore("check", str(two.mountpoint))
    assert str(entry) in report.stdout


def test_the_private_area_is_not_a_pool_file(two: MountedPool) -> None:
    private = two.path(".fusestore")
    two.path("file").write_bytes(b"x")
    assert errno_of(lambda: os.open(private, os.O_CREAT | os.O_WRONLY, 0o644)) == errno.EPERM
    assert errno_of(lambda: os.stat(private)) == errno.ENOENT
    assert errno_of(lambda: os.rename(two.path("file"), private)) == errno.EPERM
    assert errno_of(lambda: os.rename(private, two.path("other"))) == errno.ENOENT
    assert errno_of(lambda: os.unlink(private)) == errno.ENOENT
    assert errno_of(lambda: os.mkdir(private)) == errno.EPERM
    assert ".fusestore" not in os.listdir(two.mountpoint)
    assert two.path("file").read_bytes() == b"x"
    assert (two.datadirs[0].path / ".fusestore" / "mark").is_file()


def test_names_like_the_hidden_names_of_files_being_written(two: MountedPool) -> None:
    """New files are written as incoming/<instance>/1, 2, …: pool names 1, 2 are
    other files."""
    writing = os.open(two.path("in-progress"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(writing, b"hidden as 1")
    for name in ("1", "2", "incoming", "kept", "mark"):
        two.path(name).write_bytes(name.encode())
    os.close(writing)
    for name in ("1", "2", "incoming", "kept", "mark"):
        assert (two.datadirs[0].path / name).read_bytes() == name.encode()
    assert two.path("in-progress").read_bytes() == b"hidden as 1"


def test_a_name_taken_by_a_directory_sends_the_new_file_elsewhere(two: MountedPool) -> None:
    (two.datadirs[0].path / "taken").mkdir()
    two.path("taken").write_bytes(b"goes to low")
    assert (two.datadirs[1].path / "taken").read_bytes() == b"goes to low"
    assert two.path("taken").read_bytes() == b"goes to low"
    assert "non-file entry 'taken'" in two.log()


def test_a_name_taken_by_directories_everywhere_is_refused_at_open(two: MountedPool) -> None:
    for datadir in two.datadirs:
        (datadir.path / "everywhere").mkdir()
    refused = errno_of(lambda: os.open(two.path("everywhere"), os.O_CREAT | os.O_WRONLY, 0o644))
    assert refused == errno.EEXIST
    assert files_below(two.datadirs[0].path) == files_below(two.datadirs[1].path) == {}


def test_a_listing_has_dot_and_dotdot(two: MountedPool) -> None:
    two.path("a").write_bytes(b"")
    (two.datadirs[1].path / "b").write_bytes(b"")
    listed = subprocess.run(
        ["ls", "-a1f", str(two.mountpoint)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed[:2] == [".", ".."]
    assert sorted(listed[2:]) == ["a", "b"]


def test_new_names_must_fit_the_datadir_with_the_shortest_limit(
    faulty_datadir: FaultyFactory, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """A file may be published in, or moved to, any datadir: a new name must
    fit the smallest f_namemax; existing longer names stay reachable."""
    short = faulty_datadir("short-names", 16)
    short.limit_names(100)
    roomy = Datadir(tmpfs("roomy", 16), 1)
    (roomy.path / ("e" * 200)).write_bytes(b"already here")
    pool = mount_pool([Datadir(short.path, 2), roomy])
    assert os.statvfs(pool.mountpoint).f_namemax == 100
    pool.path("s" * 100).write_bytes(b"fits")
    assert (short.backing / ("s" * 100)).read_bytes() == b"fits"
    refused = errno_of(lambda: os.open(pool.path("l" * 101), os.O_CREAT | os.O_WRONLY, 0o644))
    assert refused == errno.ENAMETOOLONG
    assert errno_of(lambda: os.rename(pool.path("s" * 100), pool.path("r" * 101))) == (
        errno.ENAMETOOLONG
    )
    assert pool.path("e" * 200).read_bytes() == b"already here"
    assert files_below(short.backing) == {"s" * 100: b"fits"}
    assert files_below(roomy.path) == {"e" * 200: b"already here"}
