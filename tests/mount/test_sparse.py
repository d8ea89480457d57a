"""Sparse images through the pool: README "How it behaves", *Sparse files*.

Holes answered from the backing file (``lseek``, ``qemu-img map``),
``fallocate`` passed through (and moving a file that needs the space), a new
file placed by the size it announces, copies inside the pool made in the
kernel, and thin provisioning.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import (
    Datadir,
    Ext4Disk,
    MiB,
    MountFactory,
    TmpfsFactory,
    errno_of,
)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_qemu_img_sees_the_extents_and_convert_copies_only_the_data(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadir = Datadir(tmpfs("images", 512))
    mounted = mount_pool([datadir])
    image = mounted.path("image")
    run("qemu-img", "create", "-q", "-f", "raw", str(image), "4G")
    run("qemu-io", "-c", "write -P 0x55 0 32M", "-c", "write -P 0xaa 2G 32M", str(image))
    extents = run("qemu-img", "map", "--output=json", str(image))
    assert '"start": 0, "length": 33554432, "depth": 0, "present": true, "zero": false' in extents
    second = '"start": 2147483648, "length": 33554432, "depth": 0, "present": true'
    assert second + ', "zero": false' in extents
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 32 * MiB
        assert os.lseek(fd, 32 * MiB, os.SEEK_DATA) == 2 << 30
        assert os.lseek(fd, (2 << 30) + 32 * MiB, os.SEEK_HOLE) == (2 << 30) + 32 * MiB
        assert errno_of(os.lseek, fd, (2 << 30) + 32 * MiB, os.SEEK_DATA) == errno.ENXIO
    finally:
        os.close(fd)
    assert allocated(datadir.path / "image") == 64 * MiB
    assert "no datadir can hold" not in mounted.log()  # 4 GiB announced, none has it: fine
    run("qemu-img", "convert", "-O", "raw", str(image), str(mounted.path("copy")))
    assert allocated(datadir.path / "copy") == 64 * MiB
    assert os.stat(mounted.path("copy")).st_size == 4 << 30
    for offset in (0, 2 << 30):
        with open(mounted.path("copy"), "rb") as f:
            f.seek(offset)
            assert f.read(32 * MiB) == (b"\x55" if offset == 0 else b"\xaa") * 32 * MiB


def test_fallocate_modes_pass_through_and_punching_gives_space_back(
    ext4: Callable[..., Ext4Disk], mount_pool: MountFactory
) -> None:
    disk = ext4("disk", 128)
    mounted = mount_pool([Datadir(disk.path)])
    image = mounted.path("image")
    image.write_bytes(os.urandom(16 * MiB))
    free = os.statvfs(mounted.mountpoint).f_bavail
    run("fallocate", "--punch-hole", "--offset", "0", "--length", "8M", str(image))
    assert os.statvfs(mounted.mountpoint).f_bavail > free  # df changes
    assert allocated(disk.path / "image") == 8 * MiB
    run("fallocate", "--zero-range", "--offset", "8M", "--length", "4M", str(image))
    assert image.read_bytes()[: 12 * MiB] == bytes(12 * MiB)
    run("fallocate", "--keep-size", "--offset", "16M", "--length", "8M", str(image))
    assert os.stat(image).st_size == 16 * MiB and allocated(disk.path / "image") >= 12 * MiB
    run("fallocate", "--length", "32M", str(mounted.path("new")))
    assert os.stat(mounted.path("new")).st_size == 32 * MiB


def test_a_mode_the_datadir_cannot_do_is_eopnotsupp_and_the_file_stays(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("t", 32))])
    fd = os.open(mounted.path("new"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"data")
        result = subprocess.run(
            ["fallocate", "--zero-range", "--length", "1M", f"/proc/self/fd/{fd}"],
            capture_output=True,
            text=True,
            pass_fds=(fd,),
        )
        assert result.returncode != 0 and "Operation not supported" in result.stderr
    finally:
        os.close(fd)
    assert mounted.path("new").read_bytes() == b"data"  # not discarded as a failed write


def test_fallocate_of_a_new_empty_file_places_it_where_that_size_fits(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 100), 2), Datadir(tmpfs("large", 512), 1)
    mounted = mount_pool([small, large])
    run("fallocate", "-l", "200M", str(mounted.path("image")))
    assert mounted.holders("image") == [large.path]
    assert allocated(large.path / "image") == 200 * MiB
    assert "placed new file 'image' in" in mounted.log()
    assert "from full datadir" not in mounted.log()  # no spill-over was needed
    run("truncate", "-s", "150M", str(mounted.path("sized")))  # ftruncate up: a hint too
    assert mounted.holders("sized") == [large.path]
    mounted.path("small-one").write_bytes(b"x")  # without a hint: placement as ever
    assert mounted.holders("small-one") == [small.path]


def test_preallocating_more_than_the_datadir_holds_moves_a_file_being_written(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 32), 2), Datadir(tmpfs("large", 128), 1)
    mounted = mount_pool([small, large])
    data = os.urandom(MiB)
    with open(mounted.path("image"), "wb") as f:
        f.write(data)
        f.flush()
        assert mounted.holders("image") == []  # still being written, in small's private area
        os.posix_fallocate(f.fileno(), 0, 64 * MiB)
        f.write(data)
    assert mounted.holders("image") == [large.path]
    assert mounted.path("image").read_bytes()[: 2 * MiB] == data + data
    assert os.stat(mounted.path("image")).st_size == 64 * MiB


def test_cp_inside_the_pool_never_passes_bytes_through_the_daemon(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool([Datadir(tmpfs("a", 300))], "--debug")
    data = os.urandom(100 * MiB)
    mounted.path("source").write_bytes(data)
    before = mounted.log().count("\n")
    run("cp", str(mounted.path("source")), str(mounted.path("copy")))
    requests = mounted.log().splitlines()[before:]
    assert any(" DEBUG copy_file_range(" in line for line in requests)
    assert not any(" DEBUG read(" in line or " DEBUG write(" in line for line in requests)
    assert hashlib.sha256(mounted.path("copy").read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )


def test_a_copy_on_btrfs_is_a_reflink_and_takes_no_space(
    ext4: Callable[..., Ext4Disk], mount_pool: MountFactory
) -> None:
    disk = ext4("btrfs", 512, "btrfs")
    mounted = mount_pool([Datadir(disk.path)])
    data = os.urandom(64 * MiB)
    mounted.path("source").write_bytes(data)
    os.sync()
    used = os.statvfs(disk.path).f_blocks - os.statvfs(disk.path).f_bfree
    run("cp", str(mounted.path("source")), str(mounted.path("copy")))
    os.sync()
    grown = (os.statvfs(disk.path).f_blocks - os.statvfs(disk.path).f_bfree - used) * 4096
    assert grown < 8 * MiB, grown  # metadata only: the 64 MiB are shared
    assert mounted.path("copy").read_bytes() == data


def test_thin_provisioning_writes_zeros_as_holes_and_the_bytes_read_back(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    thin = Datadir(tmpfs("thin", 128))
    mounted = mount_pool([thin], "--thin-provisioning")
    run("dd", "if=/dev/zero", f"of={mounted.path('zeros')}", "bs=1M", "count=64", "status=none")
    assert os.stat(mounted.path("zeros")).st_size == 64 * MiB
    assert allocated(thin.path / "zeros") == 0
    assert os.getxattr(mounted.path("zeros"), "user.fusestore.md5").decode() == (
        hashlib.md5(bytes(64 * MiB)).hexdigest()
    )
    mixed = os.urandom(MiB) + bytes(4 * MiB) + os.urandom(MiB) + bytes(MiB)
    fd = os.open(mounted.path("mixed"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, mixed, 0)
        os.pwrite(fd, bytes(MiB), 0)  # zeros over data written before: punched
    finally:
        os.close(fd)
    expected = bytes(MiB) + mixed[MiB:]
    assert mounted.path("mixed").read_bytes() == expected
    # A request's edges need not fall on pages: a punched partial page stays.
    assert MiB <= allocated(thin.path / "mixed") <= MiB + 64 * 1024
    plain = mount_pool([Datadir(tmpfs("plain", 128))])
    run("dd", "if=/dev/zero", f"of={plain.path('zeros')}", "bs=1M", "count=16", "status=none")
    assert allocated(plain.datadirs[0].path / "zeros") == 16 * MiB  # off by default


def test_cp_into_a_new_name_places_the_copy_by_its_size(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 64), 2), Datadir(tmpfs("large", 256), 1)
    mounted = mount_pool([small, large])
    data = os.urandom(40 * MiB)
    mounted.path("source").write_bytes(data)
    assert mounted.holders("source") == [small.path]
    run("cp", str(mounted.path("source")), str(mounted.path("copy")))
    # small has 24 MiB left: the copy's size sent it to large before a byte moved.
    assert mounted.holders("copy") == [large.path]
    assert "from full datadir" not in mounted.log()
    assert mounted.path("copy").read_bytes() == data
