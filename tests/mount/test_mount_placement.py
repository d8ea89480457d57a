"""New files land where README "How it behaves" → *Placement* says, through a real mount."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    files_below,
)


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
    c = Datadir(tmpfs("c", 8), 1)
    mounted = mount_pool([a, b, c], "--min-free-space", "8M")
    subprocess.run(["mount", "-o", "remount,ro", str(c.path)], check=True)
    assert errno_of(lambda: write_file(mounted.path("nowhere"), b"x")) == errno.ENOSPC
    assert files_below(a.path) == files_below(b.path) == files_below(c.path) == {}
    # Every datadir tried, in lookup order, with its priority, free bytes and state.
    tried = ", ".join(
        f"{d.path} (priority {d.priority}, {free_bytes(d)} bytes free, {state})"
        for d, state in ((a, "ok"), (b, "ok"), (c, "read-only"))
    )
    lines = [line for line in mounted.log().splitlines() if " WARNING no datadir " in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f" WARNING no datadir can hold 'nowhere': each needs more than {8 * MiB} bytes free; "
        f"tried {tried}"
    ), lines[0]


def free_bytes(datadir: Datadir) -> int:
    """What placement measures: statvfs ``f_bavail * f_frsize``."""
    vfs = os.statvfs(datadir.path)
    return vfs.f_bavail * vfs.f_frsize


def test_write_beyond_the_datadir_fails_with_enospc(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    only = Datadir(tmpfs("only", 4), 0)
    mounted = mount_pool([only])
    assert errno_of(lambda: write_file(mounted.path("too-big"), os.urandom(8 * MiB))) == (
        errno.ENOSPC
    )
    # The partial file is removed at close: no byte of it anywhere, private area included.
    assert files_below(only.path) == {}
    assert "removed incomplete new file 'too-big'" in mounted.log()


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


@pytest.mark.parametrize("order", ["as-named", "reversed"])
def test_a_tie_in_priority_and_free_space_goes_to_the_datadir_given_first(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, order: str
) -> None:
    twins = [Datadir(tmpfs("twin-a", 16), 5), Datadir(tmpfs("twin-b", 16), 5)]
    if order == "reversed":
        twins.reverse()
    mounted = mount_pool(twins)
    assert os.statvfs(twins[0].path).f_bavail == os.statvfs(twins[1].path).f_bavail
    write_file(mounted.path("tied"), b"first given wins")
    assert mounted.holders("tied") == [twins[0].path]


@pytest.mark.parametrize("order", ["as-named", "reversed"])
def test_a_name_in_two_datadirs_of_one_priority_is_read_from_the_one_given_first(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, order: str
) -> None:
    twins = [Datadir(tmpfs("twin-a", 16), 5), Datadir(tmpfs("twin-b", 16), 5)]
    if order == "reversed":
        twins.reverse()
    for datadir in twins:
        (datadir.path / "both").write_bytes(datadir.path.name.encode())
    mounted = mount_pool(twins)
    assert mounted.path("both").read_bytes() == twins[0].path.name.encode()
