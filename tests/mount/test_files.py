"""Reading, writing and changing files through the mount: open flags and setattr."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    open_path_to,
    run_as_nobody,
)


@pytest.fixture
def two(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    return mount_pool([Datadir(tmpfs("hi", 32), 2), Datadir(tmpfs("lo", 32), 1)])


def backing(pool: MountedPool, name: str) -> Path:
    (holder,) = pool.holders(name)
    return holder / name


def test_o_excl_on_existing_name_is_eexist(two: MountedPool) -> None:
    (two.datadirs[1].path / "taken").write_bytes(b"keep me")
    with pytest.raises(OSError) as caught:
        os.open(two.path("taken"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert caught.value.errno == errno.EEXIST
    assert two.path("taken").read_bytes() == b"keep me"


def test_o_creat_without_excl_opens_the_existing_file(two: MountedPool) -> None:
    (two.datadirs[1].path / "existing").write_bytes(b"abc")
    fd = os.open(two.path("existing"), os.O_CREAT | os.O_RDWR)
    try:
        assert os.read(fd, 10) == b"abc"
    finally:
        os.close(fd)
    assert two.holders("existing") == [two.datadirs[1].path]


def test_o_trunc_empties_the_file_in_place(two: MountedPool) -> None:
    (two.datadirs[1].path / "log").write_bytes(b"old contents")
    with open(two.path("log"), "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC
        f.write(b"new")
    assert backing(two, "log").read_bytes() == b"new"
    assert two.holders("log") == [two.datadirs[1].path]


def test_o_append_adds_at_the_end(two: MountedPool) -> None:
    two.path("journal").write_bytes(b"one\n")
    for line in (b"two\n", b"three\n"):
        fd = os.open(two.path("journal"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    subprocess.run(["sh", "-c", f"echo four >> {two.path('journal')}"], check=True)
    assert backing(two, "journal").read_bytes() == b"one\ntwo\nthree\nfour\n"


def test_random_access_writes_and_sparse_files(two: MountedPool) -> None:
    fd = os.open(two.path("sparse"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, b"end", 5 * MiB)
        os.pwrite(fd, b"start", 0)
        assert os.pread(fd, 5, 0) == b"start"
        assert os.pread(fd, 4, 5 * MiB - 1) == b"\0end"
        assert os.fstat(fd).st_size == 5 * MiB + 3
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    data = backing(two, "sparse").read_bytes()
    assert data[:5] == b"start" and data[-3:] == b"end" and len(data) == 5 * MiB + 3


def test_dd_writes_and_reads_back_identical(two: MountedPool, tmp_path: Path) -> None:
    source = tmp_path / "random"
    source.write_bytes(os.urandom(6 * MiB + 123))
    subprocess.run(
        ["dd", f"if={source}", f"of={two.path('dd.img')}", "bs=1M", "status=none"], check=True
    )
    copy = tmp_path / "copy"
    subprocess.run(
        ["dd", f"if={two.path('dd.img')}", f"of={copy}", "bs=64K", "status=none"], check=True
    )
    assert copy.read_bytes() == source.read_bytes()
    assert backing(two, "dd.img").read_bytes() == source.read_bytes()


# fuse_write_in, before the data of a WRITE request (the debug log counts both).
WRITE_IN_SIZE = 40


def write_requests(pool: MountedPool, since: int) -> list[int]:
    """The data size of each WRITE request in the debug log after offset ``since``."""
    found = re.findall(r" DEBUG write\(inode=\d+, (\d+) bytes\)", pool.log()[since:])
    return [int(size) - WRITE_IN_SIZE for size in found]


@pytest.mark.parametrize("writer", ["python", "cp"])
def test_files_advertise_1_mib_io_so_buffered_writers_send_1_mib_requests(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path, writer: str
) -> None:
    """README *I/O size*: st_blksize is 1 MiB, so a buffered writer sends 1 MiB
    WRITE requests (counted in the daemon's debug log); a 1 MiB buffer that is
    not page-aligned, as Python's, spans 257 pages and goes as two requests,
    the kernel taking at most 256 pages in one."""
    mounted = mount_pool([Datadir(tmpfs("d", 32), 0)], "--debug")
    data = os.urandom(4 * MiB)
    since = len(mounted.log())
    if writer == "python":
        with open(mounted.path("buffered"), "wb") as f:
            assert os.fstat(f.fileno()).st_blksize == MiB  # Python, stdio, cp size buffers by it
            for offset in range(0, len(data), 64 * 1024):
                f.write(data[offset : offset + 64 * 1024])  # Glance's chunk size
    else:
        source = tmp_path / "source"
        source.write_bytes(data)
        subprocess.run(["cp", str(source), str(mounted.path("buffered"))], check=True)
    sizes = write_requests(mounted, since)
    if writer == "python":
        assert len(sizes) == 8
        assert [a + b for a, b in zip(sizes[::2], sizes[1::2], strict=True)] == [MiB] * 4
    else:
        assert sizes == [MiB] * 4
    assert os.stat(mounted.path("buffered")).st_blksize == MiB
    assert backing(mounted, "buffered").read_bytes() == data


def test_truncate_grows_and_shrinks(two: MountedPool) -> None:
    two.path("t").write_bytes(b"0123456789")
    os.truncate(two.path("t"), 4)
    assert backing(two, "t").read_bytes() == b"0123"
    subprocess.run(["truncate", "-s", "8", str(two.path("t"))], check=True)
    assert two.path("t").read_bytes() == b"0123\0\0\0\0"
    fd = os.open(two.path("t"), os.O_RDWR)
    try:
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    assert backing(two, "t").read_bytes() == b"01"


def test_chmod_chown_and_times_reach_the_backing_file(two: MountedPool) -> None:
    two.path("meta").write_bytes(b"x")
    os.chmod(two.path("meta"), 0o604)
    os.chown(two.path("meta"), 1234, 5678)
    os.utime(two.path("meta"), ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(backing(two, "meta"))
    assert stat.S_IMODE(st.st_mode) == 0o604
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    seen = os.stat(two.path("meta"))
    assert (seen.st_mode & 0o777, seen.st_uid, seen.st_mtime_ns) == (0o604, 1234, 2_000_000_000)
    subprocess.run(["touch", "-m", "-d", "2001-02-03 04:05:06Z", str(two.path("meta"))], check=True)
    st = os.stat(backing(two, "meta"))
    assert st.st_mtime == 981173106
    assert st.st_atime_ns == 1_000_000_000  # touch -m leaves atime alone


def test_setattr_through_an_open_descriptor(two: MountedPool) -> None:
    fd = os.open(two.path("fd-meta"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"contents")
        os.fchmod(fd, 0o640)
        os.utime(fd, ns=(3_000_000_000, 4_000_000_000))
    finally:
        os.close(fd)
    st = os.stat(backing(two, "fd-meta"))
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 4_000_000_000


def test_mode_of_a_new_file_honours_the_umask(two: MountedPool) -> None:
    subprocess.run(["sh", "-c", f"umask 077; : > {two.path('private')}"], check=True)
    assert stat.S_IMODE(os.stat(backing(two, "private")).st_mode) == 0o600


def test_reader_sees_what_a_writer_wrote_so_far(two: MountedPool) -> None:
    writer = os.open(two.path("growing"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(writer, b"first part")
        with open(two.path("growing"), "rb") as reader:
            assert reader.read() == b"first part"
        os.write(writer, b", second part")
        with open(two.path("growing"), "rb") as reader:
            assert reader.read() == b"first part, second part"
    finally:
        os.close(writer)


def test_write_to_read_only_descriptor_is_ebadf(two: MountedPool) -> None:
    two.path("ro").write_bytes(b"x")
    fd = os.open(two.path("ro"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, b"y")
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_permissions_are_checked_by_the_kernel(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadir = Datadir(tmpfs("perm", 8), 0)
    datadir.path.chmod(0o755)  # tmpfs starts as 1777
    shared = mount_pool([datadir], "-o", "allow_other")
    shared.path("root-only").write_bytes(b"secret")
    os.chmod(shared.path("root-only"), 0o600)
    shared.path("public").write_bytes(b"hello")
    os.chmod(shared.path("public"), 0o644)
    open_path_to(shared.mountpoint)
    denied = run_as_nobody("cat", str(shared.path("root-only")))
    assert denied.returncode == 1
    assert "Permission denied" in denied.stderr
    allowed = run_as_nobody("cat", str(shared.path("public")))
    assert allowed.returncode == 0 and allowed.stdout == "hello"
    created = run_as_nobody("touch", str(shared.path("by-nobody")))
    assert created.returncode == 1  # the mount's root mirrors the 0755 datadir
    assert "Permission denied" in created.stderr
    assert shared.holders("by-nobody") == []


def test_chmod_and_chown_of_the_mountpoint_reach_every_datadir(two: MountedPool) -> None:
    """The kernel checks create permission on the root, which shows the top
    datadir: every datadir must agree, or a file spilled lower would escape it."""
    os.chmod(two.mountpoint, 0o1777)
    os.chown(two.mountpoint, 65534, 65534)
    for datadir in two.datadirs:
        st = os.stat(datadir.path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1777, 65534, 65534)
    root = os.stat(two.mountpoint)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o1777, 65534, 65534)


@pytest.mark.parametrize("order", ["top-first", "top-last"])
def test_the_mounts_root_shows_the_top_priority_datadirs_owner_and_mode(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, order: str
) -> None:
    top, low = Datadir(tmpfs("top", 8), 2), Datadir(tmpfs("low", 8), 1)
    os.chmod(top.path, 0o2750)
    os.chown(top.path, 1234, 5678)
    os.chmod(low.path, 0o1777)
    os.chown(low.path, 4321, 8765)
    mounted = mount_pool([top, low] if order == "top-first" else [low, top])
    root = os.stat(mounted.mountpoint)
    assert stat.S_ISDIR(root.st_mode)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o2750, 1234, 5678)
    for datadir, expected in ((top, (0o2750, 1234, 5678)), (low, (0o1777, 4321, 8765))):
        st = os.stat(datadir.path)  # mounting changed neither datadir
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == expected
