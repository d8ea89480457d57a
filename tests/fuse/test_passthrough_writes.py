"""Writes the kernel makes straight to the disk (README *Performance*,
``--passthrough-headroom``): an existing file opened for writing in a datadir
with more than the headroom free above the reserve is written through FUSE
passthrough; new files, setuid files and datadirs short of the headroom keep
every write coming to the pool (publication, spill-over). The daemon's
``--debug`` log tells which writes reached it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat

import pytest

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory, eventually
from tests.fuse.test_passthrough import Requests

HEADROOM = "32M"


@pytest.fixture
def roomy(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """A pool of one 96 MiB datadir with a 32 MiB headroom and an 8 MiB reserve,
    and a 128 MiB one to spill to; skipped only where the kernel has no passthrough."""
    datadirs = [Datadir(tmpfs("roomy", 96), 2), Datadir(tmpfs("other", 128), 1)]
    mounted = mount_pool(
        datadirs, "--debug", "--passthrough-headroom", HEADROOM, "--min-free-space", "8M"
    )
    (line,) = re.findall(r"passthrough (?:on|off).*", mounted.log())
    if line.startswith("passthrough off"):
        pytest.skip(f"the daemon says {line!r} (needs Linux 6.9+ and root)")
    return mounted


def existing(mounted: MountedPool, name: str, size: int) -> bytes:
    """A file put in the top datadir directly: existing, and in passthrough's reach."""
    data = os.urandom(size)
    (mounted.datadirs[0].path / name).write_bytes(data)
    return data


def test_a_rewrite_with_headroom_goes_straight_to_the_disk_and_gets_new_checksums(
    roomy: MountedPool,
) -> None:
    data = bytearray(existing(roomy, "img", 4 * MiB))
    requests = Requests(roomy)
    fd = os.open(roomy.path("img"), os.O_RDWR)
    try:
        for block in range(0, 4 * MiB, 64 * 1024):
            os.pwrite(fd, b"w" * 4096, block)
            data[block : block + 4096] = b"w" * 4096
    finally:
        os.close(fd)
    assert requests.of(roomy.path("img"), "write") == 0  # the kernel wrote them
    assert (roomy.datadirs[0].path / "img").read_bytes() == data
    md5 = hashlib.md5(data).hexdigest()
    assert eventually(
        lambda: os.getxattr(roomy.path("img"), "user.fusestore.md5").decode() == md5
    ), "the checksums were not computed again after the rewrite"


def test_a_new_file_is_always_written_through_the_pool(roomy: MountedPool) -> None:
    requests = Requests(roomy)
    with open(roomy.path("new"), "wb", buffering=0) as f:
        f.write(os.urandom(MiB))
    assert requests.of(roomy.path("new"), "write") > 0


def test_a_setuid_file_is_written_through_the_pool(roomy: MountedPool) -> None:
    existing(roomy, "tool", MiB)
    os.chmod(roomy.datadirs[0].path / "tool", 0o4755)
    requests = Requests(roomy)
    fd = os.open(roomy.path("tool"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)
    assert requests.of(roomy.path("tool"), "write") == 1


def test_without_the_headroom_writes_come_to_the_pool_and_spill_over(
    roomy: MountedPool,
) -> None:
    data = existing(roomy, "big", 60 * MiB)  # 96 - 60 - 8 reserve: under 32 MiB left
    requests = Requests(roomy)
    with open(roomy.path("big"), "r+b", buffering=0) as f:
        f.seek(0, os.SEEK_END)
        f.write(b"g" * 40 * MiB)  # more than the datadir has: the file moves
    assert requests.of(roomy.path("big"), "write") > 0
    assert not (roomy.datadirs[0].path / "big").exists()
    moved = (roomy.datadirs[1].path / "big").read_bytes()
    assert moved == data + b"g" * 40 * MiB


def test_a_passthrough_writer_that_fills_the_datadir_gets_enospc(roomy: MountedPool) -> None:
    """The trade the headroom makes (README *Performance*): no spill-over,
    though another datadir has room."""
    data = existing(roomy, "grows", MiB)  # 96 - 1 - 8: far more than 32 MiB left
    fd = os.open(roomy.path("grows"), os.O_WRONLY | os.O_APPEND)
    written = 0
    try:
        with pytest.raises(OSError) as caught:
            while True:
                written += os.write(fd, b"z" * MiB)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
    assert 80 * MiB <= written <= 96 * MiB
    on_disk = (roomy.datadirs[0].path / "grows").read_bytes()
    assert on_disk[: len(data)] == data  # the file stayed where it was
    assert not (roomy.datadirs[1].path / "grows").exists()
    assert stat.S_ISREG(os.stat(roomy.path("grows")).st_mode)


def test_a_file_written_through_passthrough_is_never_moved_from_under_the_kernel(
    roomy: MountedPool,
) -> None:
    """fallocate comes to the pool even for a passthrough file: one that
    does not fit gets ENOSPC rather than a move, which would leave the
    kernel writing to the old backing file."""
    existing(roomy, "image", MiB)
    fd = os.open(roomy.path("image"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as caught:
            os.posix_fallocate(fd, 0, 110 * MiB)  # the other datadir could hold it
        assert caught.value.errno == errno.ENOSPC
        os.pwrite(fd, b"after", 0)
    finally:
        os.close(fd)
    assert not (roomy.datadirs[1].path / "image").exists()
    assert (roomy.datadirs[0].path / "image").read_bytes()[:5] == b"after"
    assert roomy.path("image").read_bytes()[:5] == b"after"
