"""How open files do their I/O: passthrough readers, direct_io writers, mixed opens.

With FUSE passthrough (Linux 6.9+, root) the kernel reads a file nobody
writes straight from its datadir; every other open goes through the pool.
The kernel refuses (EIO) to mix passthrough and other opens of one file
unless the daemon gets it right, so these tests open the same file in every
order and check the bytes each side sees, and in the daemon's ``--debug``
log which reads and writes reached it: none for a file in passthrough.
They skip, saying why, only when the daemon logs that passthrough is off.
"""

from __future__ import annotations

import mmap
import os
import re

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory


class Requests:
    """The requests the daemon logged (``--debug``) since this was made."""

    def __init__(self, mounted: MountedPool) -> None:
        self.mounted = mounted
        self.start = len(mounted.log())

    def of(self, path: os.PathLike[str] | str, opcode: str) -> int:
        """How many ``opcode`` requests (``read``, ``write``) for the file at ``path``."""
        inode = os.stat(path).st_ino  # the kernel's inode number is the daemon's
        return len(
            re.findall(rf"DEBUG {opcode}\(inode={inode}, ", self.mounted.log()[self.start :])
        )


@pytest.fixture
def debug_pool(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    return mount_pool([Datadir(tmpfs("hi", 32), 2), Datadir(tmpfs("lo", 32), 1)], "--debug")


@pytest.fixture
def two(debug_pool: MountedPool) -> MountedPool:
    """The pool, if the daemon says the kernel agreed to passthrough; else a skip saying so."""
    (line,) = re.findall(r"passthrough (?:on|off).*", debug_pool.log())
    if line.startswith("passthrough off"):
        pytest.skip(f"the daemon says {line!r} (needs Linux 6.9+ and root)")
    assert line.startswith("passthrough on: reads of files nobody writes go straight to the disk")
    return debug_pool


def test_a_lone_reader_reads_the_datadir_directly_and_a_writer_through_the_daemon(
    two: MountedPool,
) -> None:
    data = os.urandom(3 * MiB + 17)
    (two.datadirs[0].path / "img").write_bytes(data)
    requests = Requests(two)
    with open(two.path("img"), "rb", buffering=0) as reader:
        assert reader.read() == data
    assert requests.of(two.path("img"), "read") == 0
    with open(two.path("img"), "r+b", buffering=0) as writer:  # direct_io: through the pool
        assert writer.read(MiB) == data[:MiB]
        writer.write(b"through the daemon")
    assert requests.of(two.path("img"), "read") >= 1
    assert requests.of(two.path("img"), "write") == 1
    assert (two.datadirs[0].path / "img").read_bytes()[MiB : MiB + 18] == b"through the daemon"


def test_writer_opening_a_file_being_read_joins_its_passthrough(two: MountedPool) -> None:
    two.path("img").write_bytes(b"a" * MiB)
    requests = Requests(two)
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
    # The writer wrote straight to the datadir, as the reader read from it.
    assert requests.of(two.path("img"), "write") == 0
    assert requests.of(two.path("img"), "read") == 0


def test_reader_of_a_file_being_written_reads_each_write_through_the_daemon(
    two: MountedPool,
) -> None:
    requests = Requests(two)
    writer = os.open(two.path("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(writer, b"first ")
        reader = os.open(two.path("new"), os.O_RDONLY)  # not in passthrough: a writer has it
        try:
            assert os.pread(reader, 100, 0) == b"first "
            os.write(writer, b"second")
            assert os.pread(reader, 100, 0) == b"first second"
        finally:
            os.close(reader)
    finally:
        os.close(writer)
    assert (two.datadirs[0].path / "new").read_bytes() == b"first second"
    assert requests.of(two.path("new"), "read") == 2
    assert requests.of(two.path("new"), "write") == 2


def test_readers_in_turn_and_together_read_the_same_bytes_from_the_datadir(
    two: MountedPool,
) -> None:
    data = os.urandom(3 * MiB + 17)
    two.path("shared").write_bytes(data)
    requests = Requests(two)
    first = os.open(two.path("shared"), os.O_RDONLY)
    second = os.open(two.path("shared"), os.O_RDONLY)
    try:
        assert os.pread(first, len(data) + 1, 0) == data
        assert os.pread(second, 1000, MiB) == data[MiB : MiB + 1000]
    finally:
        os.close(first)
        os.close(second)
    assert two.path("shared").read_bytes() == data
    assert requests.of(two.path("shared"), "read") == 0


def test_open_reader_sees_a_change_made_directly_in_the_datadir(two: MountedPool) -> None:
    two.path("img").write_bytes(b"old bytes")
    requests = Requests(two)
    with open(two.path("img"), "rb", buffering=0) as reader:
        assert reader.read() == b"old bytes"
        with open(two.datadirs[0].path / "img", "r+b") as direct:
            direct.write(b"new")
        reader.seek(0)
        assert reader.read() == b"new bytes"
    assert requests.of(two.path("img"), "read") == 0


def test_mmap_reads_from_the_datadir_and_shared_writes_reach_it(two: MountedPool) -> None:
    two.path("mapped").write_bytes(b"0123456789" * 1000)
    requests = Requests(two)
    with (
        open(two.path("mapped"), "rb") as reader,
        mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as view,
    ):
        assert view[10:20] == b"0123456789"
    assert requests.of(two.path("mapped"), "read") == 0
    with open(two.path("mapped"), "r+b") as writer, mmap.mmap(writer.fileno(), 0) as view:
        view[0:5] = b"abcde"
        view.flush()
    assert (two.datadirs[0].path / "mapped").read_bytes()[:10] == b"abcde56789"
    assert requests.of(two.path("mapped"), "write") >= 1  # a writer's mapping: the daemon's


def test_listing_has_files_being_written_and_nothing_else(debug_pool: MountedPool) -> None:
    (debug_pool.datadirs[1].path / "below").write_bytes(b"x")
    (debug_pool.datadirs[0].path / "a-directory").mkdir()
    (debug_pool.datadirs[0].path / "a-link").symlink_to("below")
    with open(debug_pool.path("being-written"), "wb") as writer:
        writer.write(b"y")
        writer.flush()
        assert sorted(os.listdir(debug_pool.mountpoint)) == ["being-written", "below"]
    names = {entry.name: entry.is_file() for entry in os.scandir(debug_pool.mountpoint)}
    assert names == {"being-written": True, "below": True}
