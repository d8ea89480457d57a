"""Broken disks: README "How it behaves", *Broken disks*.

Loop-mounted ext4 datadirs whose disk is missing (an unmarked mountpoint),
remounted read-only or unmounted under a live pool.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    Ext4Disk,
    MountFactory,
    TmpfsFactory,
    errno_of,
    files_below,
    remount,
)


@pytest.fixture
def disk_first(ext4, tmpfs: TmpfsFactory) -> tuple[Ext4Disk, Datadir, Datadir]:
    """A loop-mounted ext4 datadir at priority 100 over a tmpfs one at 50."""
    disk = ext4("disk", 64)
    return disk, Datadir(disk.path, 100), Datadir(tmpfs("other", 32), 50)


def test_unmarked_empty_mountpoint_of_a_known_datadir_gets_no_files(
    disk_first, mount_pool: MountFactory
) -> None:
    disk, top, other = disk_first
    first = mount_pool([top, other])
    first.path("on-disk").write_bytes(b"kept safe")
    assert first.holders("on-disk") == [top.path]
    assert first.unmount() == 0
    disk.unmount()  # the disk fails to mount at the next boot: an empty directory

    second = mount_pool([top, other])
    second.path("while-missing").write_bytes(b"elsewhere")
    assert second.holders("while-missing") == [other.path]
    assert f"datadir {top.path} is missing" in second.log()
    assert list(top.path.iterdir()) == []  # nothing written onto the bare mountpoint

    disk.mount()  # the disk comes back: used again without a remount
    assert second.path("on-disk").read_bytes() == b"kept safe"
    second.path("after-return").write_bytes(b"home again")
    assert second.holders("after-return") == [top.path]
    assert f"datadir {top.path} is back" in second.log()


def test_brand_new_empty_datadirs_are_marked_and_used(
    tmp_path: Path, mount_pool: MountFactory
) -> None:
    fresh = Datadir(tmp_path / "brand" / "new", 1)
    mounted = mount_pool([fresh])
    mounted.path("first").write_bytes(b"1")
    assert (fresh.path / ".fusestore" / "mark").is_file()
    assert mounted.holders("first") == [fresh.path]


def test_datadir_remounted_read_only_is_taken_out_and_comes_back(
    disk_first, mount_pool: MountFactory
) -> None:
    disk, top, other = disk_first
    mounted = mount_pool([top, other])
    mounted.path("before").write_bytes(b"written while rw")
    disk.remount("ro")
    mounted.path("during").write_bytes(b"must go elsewhere")
    assert mounted.holders("during") == [other.path]
    assert mounted.path("before").read_bytes() == b"written while rw"
    with pytest.raises(OSError) as caught, open(mounted.path("before"), "ab") as f:
        f.write(b"x")
    assert caught.value.errno == errno.EROFS
    assert f"datadir {top.path} is read-only" in mounted.log()
    disk.remount("rw")
    mounted.path("after").write_bytes(b"back on the disk")
    assert mounted.holders("after") == [top.path]


def test_datadir_unmounted_under_a_live_pool(disk_first, mount_pool: MountFactory) -> None:
    disk, top, other = disk_first
    mounted = mount_pool([top, other])
    mounted.path("on-disk").write_bytes(b"on the disk")
    disk.unmount()
    mounted.path("while-gone").write_bytes(b"elsewhere")
    assert mounted.holders("while-gone") == [other.path]
    assert sorted(os.listdir(mounted.mountpoint)) == ["while-gone"]
    disk.mount()
    assert sorted(os.listdir(mounted.mountpoint)) == ["on-disk", "while-gone"]
    mounted.path("after").write_bytes(b"x")
    assert mounted.holders("after") == [top.path]


def test_every_datadir_read_only_gives_erofs_and_nothing_is_written(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadirs = [Datadir(tmpfs("a", 16), 2), Datadir(tmpfs("b", 16), 1)]
    mounted = mount_pool(datadirs)
    mounted.path("before").write_bytes(b"readable")
    for datadir in datadirs:
        remount(datadir.path, "ro")
    try:
        refused = errno_of(lambda: os.open(mounted.path("new"), os.O_CREAT | os.O_WRONLY, 0o644))
        assert refused == errno.EROFS
        assert mounted.path("before").read_bytes() == b"readable"
        assert all(f"datadir {d.path} is read-only" in mounted.log() for d in datadirs)
    finally:
        for datadir in datadirs:
            remount(datadir.path, "rw")
    assert [files_below(d.path) for d in datadirs] == [{"before": b"readable"}, {}]


@pytest.mark.parametrize("how", ["removed", "moved-away"])
def test_top_datadir_that_vanished_takes_no_new_files(
    tmp_path: Path, tmpfs: TmpfsFactory, mount_pool: MountFactory, how: str
) -> None:
    """The top datadir's directory itself is gone (removed, or renamed away):
    unreachable, so new files go to the next one, and the log says why."""
    top = Datadir(tmp_path / "top", 100)
    other = Datadir(tmpfs("other", 16), 50)
    mounted = mount_pool([top, other])
    mounted.path("on-top").write_bytes(b"before")
    assert mounted.holders("on-top") == [top.path]
    away = tmp_path / "away"
    if how == "removed":
        shutil.rmtree(top.path)
    else:
        top.path.rename(away)
    mounted.path("while-gone").write_bytes(b"elsewhere")
    assert files_below(other.path) == {"while-gone": b"elsewhere"}
    assert not top.path.exists()  # nothing recreated it
    log = mounted.log()
    assert f"datadir {top.path} is vanished: it takes no new files until it is back" in log
    (row, _) = status.read(str(mounted.mountpoint))["datadirs"]
    assert (row["path"], row["state"]) == (str(top.path), "vanished")
    if how == "moved-away":
        away.rename(top.path)  # back, mark and files: used again at once
        assert mounted.path("on-top").read_bytes() == b"before"
        mounted.path("after").write_bytes(b"home again")
        assert mounted.holders("after") == [top.path]
        assert f"datadir {top.path} is back" in mounted.log()
