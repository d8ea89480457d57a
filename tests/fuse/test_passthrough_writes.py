"""Writes the kernel makes straight to the disk (README *Writes straight to
the disk*, ``--passthrough-headroom``): a file, new or existing, opened for
writing in a datadir with more than the headroom free above the reserve is
written through FUSE passthrough; a new one is still published whole at its
last close. Setuid files and datadirs short of the headroom keep every write
coming to the pool (spill-over). The daemon's ``--debug`` log tells which
writes reached it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    eventually,
    incoming_files,
)
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


def md5_stored(mounted: MountedPool, name: str, data: bytes | bytearray) -> bool:
    """Whether the pool comes to show ``data``'s md5 as ``name``'s checksum."""
    md5 = hashlib.md5(data).hexdigest()
    return eventually(lambda: os.getxattr(mounted.path(name), "user.fusestore.md5").decode() == md5)


def published(mounted: MountedPool, name: str) -> bool:
    """Whether ``name`` is under its name in a datadir and in the pool's listing
    (its creator's kernel knows it from the start: a stat there proves nothing)."""
    return any((datadir.path / name).exists() for datadir in mounted.datadirs) and (
        name in os.listdir(mounted.mountpoint)
    )


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
    assert md5_stored(roomy, "img", data), "the checksums were not computed again after the rewrite"


def test_a_new_file_with_headroom_goes_straight_to_the_disk_and_is_published_at_close(
    roomy: MountedPool,
) -> None:
    data = os.urandom(4 * MiB)
    requests = Requests(roomy)
    with open(roomy.path("new"), "wb") as f:
        f.write(data)
        assert not published(roomy, "new")  # hidden until its close
    assert requests.of(roomy.path("new"), "write") == 0  # the kernel wrote them
    assert (roomy.datadirs[0].path / "new").read_bytes() == data
    assert roomy.path("new").read_bytes() == data
    assert incoming_files(roomy.datadirs[0]) == []
    assert md5_stored(roomy, "new", data), "no checksums for a new file written through passthrough"


def test_a_descriptor_left_open_after_a_close_keeps_the_new_file_hidden(
    roomy: MountedPool,
) -> None:
    """The kernel's FLUSH does not say whether other descriptors remain; a
    file written through passthrough must not be published by the close of
    one while another still writes (fusestore/fuse/holders.py)."""
    fd = os.open(roomy.path("dup"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    second = os.dup(fd)
    os.close(fd)  # as a shell does before running the command: a FLUSH
    try:
        os.write(second, b"x" * MiB)
        assert not published(roomy, "dup")
    finally:
        os.close(second)
    assert roomy.path("dup").read_bytes() == b"x" * MiB


def test_a_descriptor_left_open_through_a_bind_mount_keeps_the_new_file_hidden(
    roomy: MountedPool, tmp_path: Path
) -> None:
    """A program that reaches the pool by another path (a bind mount, a
    container's mount namespace): its descriptor is known by inode number."""
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(roomy.mountpoint), str(bound)], check=True)
    try:
        fd = os.open(bound / "through-bind", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        second = os.dup(fd)
        os.close(fd)
        try:
            os.write(second, b"b" * MiB)
            assert not published(roomy, "through-bind")
        finally:
            os.close(second)
        assert (roomy.datadirs[0].path / "through-bind").read_bytes() == b"b" * MiB
    finally:
        if subprocess.run(["umount", str(bound)], check=False).returncode:
            subprocess.run(["umount", "-l", str(bound)], check=False)


def test_a_child_writing_an_inherited_descriptor_keeps_the_new_file_hidden(
    roomy: MountedPool,
) -> None:
    """The creator closes its descriptor first; its child writes on and
    closes last: the file appears only then, whole."""
    fd = os.open(roomy.path("inherited"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"parent,")
        program = f"import os, sys; sys.stdin.read(3); os.write({fd}, b'child')"
        child = subprocess.Popen(
            [sys.executable, "-c", program], stdin=subprocess.PIPE, pass_fds=[fd]
        )
    finally:
        os.close(fd)
    try:
        assert not published(roomy, "inherited")
        child.communicate(b"go\n", timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0
    assert eventually(lambda: published(roomy, "inherited"))
    assert roomy.path("inherited").read_bytes() == b"parent,child"


def test_a_shell_redirect_written_through_passthrough_appears_whole(roomy: MountedPool) -> None:
    """``{ …; } > file``: the shell dup2s the file onto stdout and closes
    it, a child writes, then the shell restores stdout. Never seen in part."""
    script = f"{{ printf first; sleep 1; printf second; }} > {roomy.path('redirected')}"
    shell = subprocess.Popen(["sh", "-c", script])
    try:
        seen_early = []
        while shell.poll() is None:
            seen_early.append(published(roomy, "redirected"))
            time.sleep(0.05)
    finally:
        shell.kill()
    assert shell.returncode == 0
    assert not any(seen_early[:-1])
    assert roomy.path("redirected").read_bytes() == b"firstsecond"


def test_a_new_passthrough_file_that_fills_its_datadir_is_not_published(
    roomy: MountedPool,
) -> None:
    """Its writer meets ENOSPC (no spill-over in passthrough), and close()
    reports it: the partial file is removed, as a failed write's would be."""
    fd = os.open(roomy.path("huge"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with pytest.raises(OSError) as caught:
            while True:
                os.write(fd, b"h" * MiB)
        assert caught.value.errno == errno.ENOSPC
    finally:
        with pytest.raises(OSError) as at_close:
            os.close(fd)
    assert at_close.value.errno == errno.ENOSPC
    assert not roomy.path("huge").exists()
    assert not (roomy.datadirs[1].path / "huge").exists()
    assert incoming_files(roomy.datadirs[0]) == []
    assert os.statvfs(roomy.datadirs[0].path).f_bfree * 4096 > 80 * MiB  # space given back


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


def test_kill_9_while_a_new_file_is_written_straight_to_the_disk_leaves_no_file_under_its_name(
    roomy: MountedPool, mount_pool: MountFactory
) -> None:
    """The kernel may go on writing the hidden backing file after the daemon
    died; nothing publishes it, and the next mount removes it."""
    fd = os.open(roomy.path("interrupted"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(8):
            os.write(fd, b"i" * MiB)
        roomy.process.send_signal(signal.SIGKILL)
        roomy.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.write(fd, b"after the daemon died")
    finally:
        with pytest.raises(OSError) as caught:
            os.close(fd)  # no daemon to publish it: the descriptor goes all the same
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
    roomy.stop()
    assert len(incoming_files(roomy.datadirs[0])) == 1
    remounted = mount_pool(roomy.datadirs)
    assert "interrupted" not in os.listdir(remounted.mountpoint)
    assert [incoming_files(d) for d in roomy.datadirs] == [[], []]
    assert "removed leftover of an unfinished write" in remounted.log()
