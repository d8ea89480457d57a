"""How open files do their I/O: passthrough readers, direct_io writers, mixed opens.

With FUSE passthrough (Linux 6.9+, root) the kernel reads a file nobody
writes straight from its datadir; every other open goes through the pool.
The kernel refuses (EIO) to mix passthrough and other opens of one file
unless the daemon gets it right, so these tests open the same file in every
order and check the bytes each side sees.
"""

from __future__ import annotations

import mmap
import os
import platform

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory


@pytest.fixture
def two(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    return mount_pool([Datadir(tmpfs("hi", 32), 2), Datadir(tmpfs("lo", 32), 1)])


def _kernel_has_passthrough() -> bool:
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 9) and os.geteuid() == 0


@pytest.mark.skipif(
    not _kernel_has_passthrough(), reason="FUSE passthrough needs Linux 6.9+ and root"
)
def test_log_says_passthrough_is_on(two: MountedPool) -> None:
    assert "passthrough on" in two.log()


def test_writer_opening_a_file_being_read_shares_it(two: MountedPool) -> None:
    two.path("img").write_bytes(b"a" * MiB)
    reader = os.open(two.path("img"), os.O_RDONLY)
    try:
        assert os.pread(reader, 4, 0) == b"aaaa"
        writer = os.open(two.path("img"), os.O_WRONLY)  # EIO if the kernel's modes clash
        try:
            assert os.pwrite(writer, b"bbbb", 0) == 4
        finally:
            os.close(writer)
        assert os.pread(reader, 6, 0) == b"bbbbaa"
    finally:
        os.close(reader)
    assert (two.datadirs[0].path / "img").read_bytes()[:6] == b"bbbbaa"


def test_reader_of_a_file_being_written_sees_each_write(two: MountedPool) -> None:
    writer = os.open(two.path("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(writer, b"first ")
        reader = os.open(two.path("new"), os.O_RDONLY)
        try:
            assert os.pread(reader, 100, 0) == b"first "
            os.write(writer, b"second")
            assert os.pread(reader, 100, 0) == b"first second"
        finally:
            os.close(reader)
    finally:
        os.close(writer)
    assert (two.datadirs[0].path / "new").read_bytes() == b"first second"


def test_readers_in_turn_and_together_read_the_same_bytes(two: MountedPool) -> None:
    data = os.urandom(3 * MiB + 17)
    two.path("shared").write_bytes(data)
    first = os.open(two.path("shared"), os.O_RDONLY)
    second = os.open(two.path("shared"), os.O_RDONLY)
    try:
        assert os.pread(first, len(data) + 1, 0) == data
        assert os.pread(second, 1000, MiB) == data[MiB : MiB + 1000]
    finally:
        os.close(first)
        os.close(second)
    assert two.path("shared").read_bytes() == data


def test_open_reader_sees_a_change_made_directly_in_the_datadir(two: MountedPool) -> None:
    two.path("img").write_bytes(b"old bytes")
    with open(two.path("img"), "rb", buffering=0) as reader:
        assert reader.read() == b"old bytes"
        with open(two.datadirs[0].path / "img", "r+b") as direct:
            direct.write(b"new")
        reader.seek(0)
        assert reader.read() == b"new bytes"


def test_mmap_reads_and_shared_writes(two: MountedPool) -> None:
    two.path("mapped").write_bytes(b"0123456789" * 1000)
    with (
        open(two.path("mapped"), "rb") as reader,
        mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as view,
    ):
        assert view[10:20] == b"0123456789"
    with open(two.path("mapped"), "r+b") as writer, mmap.mmap(writer.fileno(), 0) as view:
        view[0:5] = b"abcde"
        view.flush()
    assert (two.datadirs[0].path / "mapped").read_bytes()[:10] == b"abcde56789"


def test_listing_has_files_being_written_and_nothing_else(two: MountedPool) -> None:
    (two.datadirs[1].path / "below").write_bytes(b"x")
    (two.datadirs[0].path / "a-directory").mkdir()
    (two.datadirs[0].path / "a-link").symlink_to("below")
    with open(two.path("being-written"), "wb") as writer:
        writer.write(b"y")
        writer.flush()
        assert sorted(os.listdir(two.mountpoint)) == ["being-written", "below"]
    names = {entry.name: entry.is_file() for entry in os.scandir(two.mountpoint)}
    assert names == {"being-written": True, "below": True}
