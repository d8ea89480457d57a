"""setuid and setgid bits go as on a local filesystem when someone else writes.

README "How it behaves" → *setuid and setgid*: a write or truncation by a process
without CAP_FSETID clears setuid, and setgid where the group may execute;
chown clears both. The daemon writes as root, so without care the backing
filesystem would keep them. Every I/O path: direct_io writes, a writer
joining a passthrough file, truncation, a truncating open, a spill-over move.
"""

from __future__ import annotations

import os
import stat
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
def shared(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """A pool other users may use: 8 MiB at priority 2, 64 MiB at priority 1."""
    datadirs = [Datadir(tmpfs("small", 8), 2), Datadir(tmpfs("big", 64), 1)]
    mounted = mount_pool(datadirs, "-o", "allow_other")
    open_path_to(mounted.mountpoint)
    return mounted


def root_file(pool: MountedPool, name: str, mode: int, data: bytes = b"root's") -> Path:
    path = pool.path(name)
    path.write_bytes(data)
    os.chmod(path, mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def append_as_nobody(path: Path, data: str = "nobody's") -> None:
    result = run_as_nobody("sh", "-c", 'printf %s "$2" >> "$1"', "sh", str(path), data)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("mode", "after"),
    [
        (0o6777, 0o777),
        (0o4777, 0o777),
        (0o2777, 0o777),  # setgid with group execute goes
        (0o6757, 0o757),
        (0o2767, 0o2767),  # setgid without group execute is a locking mark: it stays
    ],
    ids=lambda mode: f"{mode:o}",
)
def test_a_write_by_another_user_clears_the_bits(
    shared: MountedPool, mode: int, after: int
) -> None:
    path = root_file(shared, "image", mode)
    append_as_nobody(path)
    assert mode_of(path) == after  # at once: the kernel's cached mode is dropped
    assert mode_of(shared.datadirs[0].path / "image") == after
    assert path.read_bytes() == b"root'snobody's"


def test_a_write_by_root_keeps_the_bits(shared: MountedPool) -> None:
    path = root_file(shared, "image", 0o6777)
    with path.open("ab") as f:
        f.write(b" and more")
    assert mode_of(path) == 0o6777
    assert mode_of(shared.datadirs[0].path / "image") == 0o6777


def test_truncation_by_another_user_clears_the_bits(shared: MountedPool) -> None:
    path = root_file(shared, "image", 0o6777)
    result = run_as_nobody("truncate", "-s", "2", str(path))
    assert result.returncode == 0, result.stderr
    assert mode_of(path) == 0o777 and path.read_bytes() == b"ro"


def test_a_truncating_open_by_another_user_clears_the_bits(shared: MountedPool) -> None:
    path = root_file(shared, "image", 0o6777)
    result = run_as_nobody("sh", "-c", 'printf new > "$1"', "sh", str(path))
    assert result.returncode == 0, result.stderr
    assert mode_of(path) == 0o777 and path.read_bytes() == b"new"
    assert mode_of(shared.datadirs[0].path / "image") == 0o777


def test_chown_clears_the_bits(shared: MountedPool) -> None:
    path = root_file(shared, "image", 0o6777)
    os.chown(path, 65534, 65534)
    assert mode_of(path) == 0o777
    assert os.stat(shared.datadirs[0].path / "image").st_uid == 65534


def test_a_writer_joining_a_passthrough_reader_clears_the_bits(shared: MountedPool) -> None:
    assert "passthrough on" in shared.log()
    path = root_file(shared, "image", 0o6777)
    with path.open("rb") as reader:  # the file is now read through passthrough
        append_as_nobody(path)
        assert reader.read() == b"root'snobody's"
    assert mode_of(path) == 0o777
    assert mode_of(shared.datadirs[0].path / "image") == 0o777


def test_a_write_that_moves_the_file_clears_the_bits_on_the_new_disk(
    shared: MountedPool,
) -> None:
    small, big = (d.path for d in shared.datadirs)
    data = os.urandom(6 * MiB)
    path = root_file(shared, "image", 0o6777, data)
    assert (small / "image").exists()
    more = os.urandom(4 * MiB)
    source = shared.log_path.parent / "more"
    source.write_bytes(more)
    source.chmod(0o644)
    open_path_to(source)
    result = run_as_nobody("sh", "-c", 'cat "$2" >> "$1"', "sh", str(path), str(source))
    assert result.returncode == 0, result.stderr
    assert not (small / "image").exists()
    assert (big / "image").read_bytes() == data + more
    assert mode_of(big / "image") == 0o777 and mode_of(path) == 0o777
