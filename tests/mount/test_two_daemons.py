"""Two daemons, one pool, and files renamed, unlinked or raced for while open:
README "How it behaves", *Two daemons, one pool*, *Never replaces*, *Open files*.
"""

from __future__ import annotations

import errno
import os
import re
from datetime import UTC, datetime

import pytest

from tests.conftest import (
    Datadir,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    incoming_files,
    is_mounted,
    kept_files,
)


def test_two_mounts_of_one_pool_see_each_other_and_never_mix_a_file(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    started = datetime.now(UTC).replace(microsecond=0)
    datadirs = [Datadir(tmpfs("a", 32), 2), Datadir(tmpfs("b", 32), 1)]
    one = mount_pool(datadirs)
    writing = os.open(one.path("in-progress"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(writing, b"not yet closed")
    two = mount_pool(datadirs)  # must not sweep one's unfinished file
    one.path("from-one").write_bytes(b"1")
    assert (two.path("from-one")).read_bytes() == b"1"

    first = os.open(one.path("contested"), os.O_CREAT | os.O_WRONLY, 0o644)
    second = os.open(two.path("contested"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(first, b"A" * 1000)
    os.write(second, b"B" * 2000)
    os.close(first)
    with pytest.raises(OSError) as caught:
        os.close(second)
    assert caught.value.errno == errno.EEXIST
    assert one.path("contested").read_bytes() == b"A" * 1000
    assert two.path("contested").read_bytes() == b"A" * 1000
    (kept,) = [p for d in datadirs for p in kept_files(d)]
    assert kept.read_bytes() == b"B" * 2000
    # README *Never replaces*: kept as <name>.<UTC time>.<id>.
    named = re.fullmatch(r"contested\.(\d{8}T\d{6})\.([0-9A-Za-z]+)", kept.name)
    assert named is not None, kept.name
    stamp = datetime.strptime(named[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    assert started <= stamp <= datetime.now(UTC)
    assert "could not be published" in two.log()

    os.write(writing, b", now closed")
    os.close(writing)
    assert two.path("in-progress").read_bytes() == b"not yet closed, now closed"


def test_fsync_of_a_name_taken_meanwhile_reports_eexist(solo: tuple[Datadir, MountedPool]) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("late"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"mine")
        (datadir.path / "late").write_bytes(b"someone else's")
        fsync_errno = errno_of(lambda: os.fsync(fd))
    finally:
        close_errno = close_reporting(fd)  # never raises: a failure above stays the failure
    assert fsync_errno == errno.EEXIST
    assert close_errno == errno.EEXIST  # and the data is kept aside
    assert (datadir.path / "late").read_bytes() == b"someone else's"
    assert [p.read_bytes() for p in kept_files(datadir)] == [b"mine"]


def close_reporting(fd: int) -> int | None:
    """Close ``fd``; the errno close() reported, or None."""
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno
    return None


def test_unlinked_new_file_is_discarded_at_close(solo: tuple[Datadir, MountedPool]) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("scratch"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"temporary")
    os.unlink(mounted.path("scratch"))
    os.close(fd)
    assert datadir.names() == set() and incoming_files(datadir) == []


def test_unlinked_new_file_stays_readable_through_a_surviving_descriptor(
    solo: tuple[Datadir, MountedPool],
) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("scratch"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"still mine")
    os.unlink(mounted.path("scratch"))
    survivor = os.dup(fd)
    os.close(fd)  # flush: the hidden name goes, the bytes stay with the survivor
    try:
        assert incoming_files(datadir) == []
        assert os.pread(survivor, 100, 0) == b"still mine"
    finally:
        os.close(survivor)
    assert datadir.names() == set()


def test_new_file_renamed_while_open_is_published_under_the_new_name(
    solo: tuple[Datadir, MountedPool],
) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("image.part"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"complete image")
    os.rename(mounted.path("image.part"), mounted.path("image"))
    assert not (datadir.path / "image").exists()  # still not closed
    os.close(fd)
    assert datadir.names() == {"image"}
    assert (datadir.path / "image").read_bytes() == b"complete image"


def test_private_area_name_is_reserved(solo: tuple[Datadir, MountedPool]) -> None:
    _, mounted = solo
    with pytest.raises(OSError) as caught:
        mounted.path(".fusestore").write_bytes(b"x")
    assert caught.value.errno == errno.EPERM
    assert is_mounted(mounted.mountpoint)
