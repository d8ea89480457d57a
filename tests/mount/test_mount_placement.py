"""New files land where README "How it behaves" → *Placement* says, through a real mount."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory


def write_file(path: os.PathLike[str] | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def test_four_20mib_files_land_by_priority_then_free_space(pool: MountedPool) -> None:
    small, medium, big = (d.path for d in pool.datadirs)
    contents = {f"image-{i}": os.urandom(20 * MiB) for i in range(4)}
    for name, data in contents.items():
        write_file(pool.path(name), data)
    assert [pool.holders(name) for name in contents] == [[medium], [small], [medium], [big]]
    for name, data in contents.items():
        assert pool.path(name).read_bytes() == data
        holder = pool.holders(name)[0]
        assert (holder / name).read_bytes() == data


def test_cp_of_a_file_lands_in_the_best_datadir(pool: MountedPool, tmp_path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(3 * MiB))
    subprocess.run(["cp", str(source), str(pool.path("copied.img"))], check=True)
    assert pool.holders("copied.img") == [pool.datadirs[1].path]  # 48 MiB, most free
    assert pool.path("copied.img").read_bytes() == source.read_bytes()


def test_no_datadir_with_room_gives_enospc_and_logs_what_was_tried(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    a = Datadir(tmpfs("a", 8), 10)
    b = Datadir(tmpfs("b", 8), 5)
    mounted = mount_pool([a, b], "--min-free-space", "8M")
    with pytest.raises(OSError) as caught:
        write_file(mounted.path("nowhere"), b"x")
    assert caught.value.errno == errno.ENOSPC
    assert mounted.holders("nowhere") == []
    log = mounted.log()
    assert "no datadir can hold 'nowhere'" in log
    assert f"{a.path} (priority 10" in log and f"{b.path} (priority 5" in log


def test_write_beyond_the_datadir_fails_with_enospc(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    only = Datadir(tmpfs("only", 4), 0)
    mounted = mount_pool([only])
    with pytest.raises(OSError) as caught:
        write_file(mounted.path("too-big"), os.urandom(8 * MiB))
    assert caught.value.errno == errno.ENOSPC


def test_reserve_is_rechecked_for_every_new_file(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    top = Datadir(tmpfs("top", 16), 9)
    low = Datadir(tmpfs("low", 64), 1)
    mounted = mount_pool([top, low], "--min-free-space", "9M")
    write_file(mounted.path("first"), os.urandom(8 * MiB))
    write_file(mounted.path("second"), os.urandom(1 * MiB))
    assert mounted.holders("first") == [top.path]
    assert mounted.holders("second") == [low.path]
