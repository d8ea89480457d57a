"""Reading a datadir's names with getdents64 (fusestore/pool/listing.py), on real tmpfs directories.

Every listing is checked against ``os.scandir``; the tests below also make
sure that each way of taking a read apart (column copies, one entry at a
time, os.scandir for a directory of names of many lengths) is really used.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from fusestore.pool import listing
from tests.conftest import TmpfsFactory


def by_scandir(path: Path) -> list[bytes]:
    return sorted(e.name for e in os.scandir(os.fsencode(path)) if e.is_file(follow_symlinks=False))


def touch(directory: Path, name: str | bytes) -> None:
    os.close(os.open(os.path.join(os.fsencode(directory), os.fsencode(name)), os.O_CREAT, 0o644))


def reads(directory: Path, *sizes: int) -> list[bytes]:
    """What getdents64 returns for ``directory``, read ``sizes`` bytes at a time."""
    buffer = listing._buffers
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [bytes(buffer.view[: listing._getdents64(fd, buffer.address, n)]) for n in sizes]
    finally:
        os.close(fd)
        listing.ctypes.memset(buffer.address, 0, listing._BUFFER_SIZE)


def taken_apart(data: bytes, directory: Path | None = None) -> list[bytes]:
    """The names in a read, by column copies (or one by one, given the directory)."""
    view = memoryview(data + bytes(listing._SLACK))
    if directory is None:
        return listing._regular_names(view, len(data))
    return listing._regular_names_one_by_one(view, len(data), os.fsencode(directory))


def test_uniform_names_over_several_reads_are_taken_apart_by_columns(
    tmpfs: TmpfsFactory,
) -> None:
    directory = tmpfs("uniform", 64)
    # UUID-like names: 36 bytes, 56-byte entries; 40,000 of them need 3 reads.
    for index in range(40_000):
        touch(directory, f"{index:08d}-0000-4000-8000-000000000000")
    (directory / ".fusestore").mkdir()  # the private area is a directory: not listed
    names = listing.regular_files(str(directory))
    assert sorted(names) == by_scandir(directory)
    assert len(names) == 40_000
    (read,) = reads(directory, listing._BUFFER_SIZE)
    assert len(taken_apart(read)) > 10_000


def test_every_kind_of_name_and_entry(tmpfs: TmpfsFactory) -> None:
    directory = tmpfs("odd", 64)
    for length in range(1, 256):
        touch(directory, "n" * length)
    for name in (b"with space", b"new\nline", b"\xff\xfe not utf-8", b"tab\there", b"-"):
        touch(directory, name)
    (directory / "subdir").mkdir()
    (directory / "symlink").symlink_to(directory / "n")
    os.mkfifo(directory / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(directory / "sock"))
    try:
        names = listing.regular_files(str(directory))
    finally:
        server.close()
    assert sorted(names) == by_scandir(directory)
    assert len(names) == 255 + 5
    for hidden in (b"subdir", b"symlink", b"fifo", b"sock", b".", b".."):
        assert hidden not in names


def test_names_of_many_lengths_are_not_taken_apart_by_columns(tmpfs: TmpfsFactory) -> None:
    directory = tmpfs("many-lengths", 64)
    for index in range(3000):
        touch(directory, "x" * (1 + index % 200) + str(index))
    (read,) = reads(directory, listing._BUFFER_SIZE)
    with pytest.raises(listing._Unexpected):
        taken_apart(read)
    assert sorted(taken_apart(read, directory)) == by_scandir(directory)
    assert sorted(listing.regular_files(str(directory))) == by_scandir(directory)


def test_a_later_read_of_many_lengths_is_taken_apart_one_by_one(tmpfs: TmpfsFactory) -> None:
    directory = tmpfs("mixed", 64)
    # tmpfs lists the newest first: the first read holds only the uniform
    # names made last, a later one the names of many lengths made first.
    for index in range(1500):
        touch(directory, "y" * (1 + index % 150) + f"-{index}")
    for index in range(4000):
        touch(directory, f"u{index:05d}")
    first, later = reads(directory, listing._FIRST_READ_SIZE, listing._BUFFER_SIZE)
    assert all(name.startswith(b"u") for name in taken_apart(first))
    with pytest.raises(listing._Unexpected):
        taken_apart(later)
    assert len(taken_apart(first)) + len(taken_apart(later, directory)) == 5500
    names = listing.regular_files(str(directory))
    assert sorted(names) == by_scandir(directory)
    assert len(names) == 5500


def test_empty_directory_and_errors(tmpfs: TmpfsFactory) -> None:
    directory = tmpfs("empty", 4)
    assert listing.regular_files(str(directory)) == []
    missing = listing.regular_files_or_error(str(directory / "absent"))
    assert isinstance(missing, OSError) and missing.errno == errno.ENOENT
    touch(directory, "file")
    not_a_directory = listing.regular_files_or_error(str(directory / "file"))
    assert isinstance(not_a_directory, OSError) and not_a_directory.errno == errno.ENOTDIR


def test_lister_workers_are_not_pinned_to_the_callers_cpu() -> None:
    everywhere = os.sched_getaffinity(0)
    lister = listing.DatadirLister()
    try:
        os.sched_setaffinity(0, {min(everywhere)})
        try:
            cpus = lister.submit(os.sched_getaffinity, 0).result(timeout=10)
        finally:
            os.sched_setaffinity(0, everywhere)
    finally:
        lister.stop()
    assert cpus == everywhere


def dirent64(name: bytes, kind: int) -> bytes:
    """One ``struct linux_dirent64`` as the kernel writes it (padding zeroed)."""
    size = -(-(19 + len(name) + 1) // 8) * 8
    head = struct.pack("=QqHB", 1234, 0, size, kind)
    return head + name + bytes(size - len(head) - len(name))


def test_entries_without_a_type_are_looked_at_with_lstat(tmpfs: TmpfsFactory) -> None:
    # Filesystems that do not record types give DT_UNKNOWN (0) for every
    # entry; tmpfs records them, so the read is written here as such a
    # filesystem would return it, for names that really are in the directory.
    directory = tmpfs("untyped", 4)
    touch(directory, "image")
    (directory / "subdir").mkdir()
    (directory / "link").symlink_to(directory / "image")
    read = b"".join(dirent64(name, 0) for name in (b"image", b"subdir", b"link", b"gone"))
    with pytest.raises(listing._Unexpected):
        taken_apart(read)
    assert taken_apart(read, directory) == [b"image"]
