"""Never lose an image, by breaking things on purpose.

README, "How it behaves": *Crash-safe publication*, *Failed writes*, *Never replaces*.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    Ext4Disk,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    is_mounted,
)


def incoming_files(datadir: Datadir) -> list[Path]:
    """Files being written (or left over) in a datadir's private area."""
    root = datadir.path / ".fusestore" / "incoming"
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def kept_files(datadir: Datadir) -> list[Path]:
    kept = datadir.path / ".fusestore" / "kept"
    return sorted(kept.iterdir()) if kept.exists() else []


def used_bytes(datadir: Datadir) -> int:
    vfs = os.statvfs(datadir.path)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def dd(target: Path, size_mib: int, source: str = "/dev/urandom") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dd", f"if={source}", f"of={target}", "bs=1M", f"count={size_mib}", "status=none"],
        capture_output=True,
        text=True,
        check=False,
    )


# ------------------------------------------------------- crash-safe publishing


@pytest.fixture
def solo(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> tuple[Datadir, MountedPool]:
    """A pool of one 16 MiB tmpfs datadir."""
    datadir = Datadir(tmpfs("solo", 16), 0)
    return datadir, mount_pool([datadir])


def test_new_file_is_hidden_until_closed_but_usable_through_the_mount(
    solo: tuple[Datadir, MountedPool],
) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"half of it")
        assert not (datadir.path / "image").exists()
        (hidden,) = incoming_files(datadir)
        assert hidden.read_bytes() == b"half of it"
        assert os.stat(mounted.path("image")).st_size == 10
        assert mounted.path("image").read_bytes() == b"half of it"
        assert "image" in os.listdir(mounted.mountpoint)
        os.write(fd, b", and the rest")
    finally:
        os.close(fd)
    assert (datadir.path / "image").read_bytes() == b"half of it, and the rest"
    assert incoming_files(datadir) == []
    assert datadir.names() == {"image"}


def test_empty_new_file_is_published_when_released(solo: tuple[Datadir, MountedPool]) -> None:
    datadir, mounted = solo
    subprocess.run(["touch", str(mounted.path("empty"))], check=True)
    assert os.stat(mounted.path("empty")).st_size == 0
    # The kernel sends RELEASE just after close() returns.
    deadline = time.monotonic() + 5
    while "empty" not in datadir.names() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert datadir.names() == {"empty"}
    assert incoming_files(datadir) == []


def test_shell_redirection_publishes_only_the_finished_file(
    solo: tuple[Datadir, MountedPool],
) -> None:
    """The shell dup2()s the new file onto stdout and closes it before writing."""
    datadir, mounted = solo
    script = f"exec > {mounted.path('redirected')}; echo first; ls {datadir.path}; echo last"
    result = subprocess.run(["sh", "-c", script], check=True)
    assert result.returncode == 0
    listing_while_open = mounted.path("redirected").read_text().splitlines()
    assert listing_while_open[0] == "first" and listing_while_open[-1] == "last"
    assert "redirected" not in listing_while_open[1:-1]  # not published while being written
    assert datadir.names() == {"redirected"}


def test_writer_that_forks_never_leaves_a_partial_file_under_the_name(
    solo: tuple[Datadir, MountedPool],
) -> None:
    """A child's close-on-exec of the writer's descriptor is a close() too."""
    datadir, mounted = solo
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"first half, ")
        subprocess.run(["true"], check=True)  # fork + exec: the kernel sends a flush
        assert (datadir.path / "image").read_bytes() == b"first half, "  # whole as of then
        os.write(fd, b"second half")
        assert "image" not in datadir.names()  # being written again: hidden
        (hidden,) = incoming_files(datadir)
        assert hidden.read_bytes() == b"first half, second half"
    finally:
        os.close(fd)
    assert (datadir.path / "image").read_bytes() == b"first half, second half"
    assert incoming_files(datadir) == []


def test_kill_9_mid_write_leaves_no_file_under_the_name(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadirs = [Datadir(tmpfs("fast", 160), 10), Datadir(tmpfs("big", 160), 5)]
    mounted = mount_pool(datadirs)
    finished = os.urandom(3 * MiB)
    mounted.path("finished").write_bytes(finished)
    fd = os.open(mounted.path("interrupted"), os.O_CREAT | os.O_WRONLY, 0o644)
    chunk = os.urandom(MiB)
    for _ in range(50):  # half of a 100 MiB image
        os.write(fd, chunk)
    mounted.process.send_signal(signal.SIGKILL)
    mounted.process.wait(timeout=10)
    with pytest.raises(OSError) as caught:
        os.write(fd, chunk)
    # ENOTCONN through /dev/fuse; ECONNABORTED when io_uring queues were torn down.
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    with pytest.raises(OSError):
        os.close(fd)  # the descriptor is released even so
    mounted.stop()  # fusermount3 -u of the dead mount
    assert [len(incoming_files(d)) for d in datadirs] == [1, 0]  # the crash left a hidden file

    remounted = mount_pool(datadirs)
    with pytest.raises(FileNotFoundError):
        os.stat(remounted.path("interrupted"))
    assert all("interrupted" not in d.names() for d in datadirs)
    assert [incoming_files(d) for d in datadirs] == [[], []]
    assert "removed leftover of an unfinished write" in remounted.log()
    assert f"({50 * MiB} bytes)" in remounted.log()
    assert remounted.path("finished").read_bytes() == finished
    assert sorted(os.listdir(remounted.mountpoint)) == ["finished"]


def test_durable_by_default_fsyncs_file_and_directory_before_publishing(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 16), 0)])
    calls = trace_syscalls(mounted, tmp_path, lambda: mounted.path("durable").write_bytes(b"x"))
    fsyncs = [i for i, call in enumerate(calls) if call.startswith("fsync(")]
    links = [i for i, call in enumerate(calls) if call.startswith("link(")]
    assert len(links) == 1 and len(fsyncs) == 2, calls
    assert fsyncs[0] < links[0] < fsyncs[1]  # data, then publish, then the directory entry


def test_no_sync_skips_the_fsyncs(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 16), 0)], "--no-sync")
    calls = trace_syscalls(mounted, tmp_path, lambda: mounted.path("fast").write_bytes(b"x"))
    assert [c for c in calls if c.startswith("link(")], calls
    assert not [c for c in calls if c.startswith("fsync(")], calls
    assert mounted.path("fast").read_bytes() == b"x"


def trace_syscalls(mounted: MountedPool, tmp_path: Path, action) -> list[str]:
    """The daemon's fsync/link/unlink calls while ``action`` runs, in order."""
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,link,linkat",
            "-o",
            str(out),
            "-p",
            str(mounted.process.pid),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # let strace attach
        action()
        time.sleep(0.2)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    lines = out.read_text().splitlines()
    return [line.split(" ", 1)[1].strip() for line in lines if " " in line]


# ------------------------------------------------------------------ spill-over


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


# --------------------------------------------------------------- broken disks


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


# ------------------------------------------------------------ two daemons


def test_two_mounts_of_one_pool_see_each_other_and_never_mix_a_file(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
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
    assert kept.name.startswith("contested.") and kept.read_bytes() == b"B" * 2000
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
        with pytest.raises(OSError) as caught:
            os.fsync(fd)
        assert caught.value.errno == errno.EEXIST
    finally:
        with pytest.raises(OSError):
            os.close(fd)
    assert (datadir.path / "late").read_bytes() == b"someone else's"
    assert [p.read_bytes() for p in kept_files(datadir)] == [b"mine"]


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
