"""Failing disks under a live pool: README "How it behaves", *Failed writes*, *Broken disks*.

Why it exists: these promises are about errors a tmpfs never makes. Each
test puts a faultyfs datadir (``tests/faulty.py``) at the top of a pool over
a plain tmpfs one, makes one kind of request on it fail, drives the mount
with ordinary ``os`` calls and checks the exact errno the program sees, which
datadir holds the bytes (the private area included) and what is logged.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    MountFactory,
    TmpfsFactory,
    errno_of,
    eventually,
    files_below,
    is_mounted,
)
from tests.faulty import FaultyFactory, waits_for_fuse
from tests.mount.conftest import INCOMING, FaultyPool, closed_on_failure, make_rig

MiB = 1 << 20


def test_a_healthy_faulty_datadir_serves_the_pool_as_a_plain_one(rig: FaultyPool) -> None:
    """Without faults, faultyfs passes through what the pool does to a datadir:
    its private area (mkdir, the mark by rename, fsyncdir), publication by
    link(2), setattr, rename, unlink, listing and statfs."""
    pool = rig.mounted
    data = os.urandom(3 * MiB)
    pool.path("a").write_bytes(data)
    with open(pool.path("a"), "ab") as f:
        f.write(b"tail")
    os.chmod(pool.path("a"), 0o640)
    os.chown(pool.path("a"), 65534, 65534)
    os.utime(pool.path("a"), ns=(1_000_000_000, 2_000_000_000))
    os.rename(pool.path("a"), pool.path("b"))
    backing = os.stat(rig.faulty.backing / "b")
    assert (backing.st_mode & 0o7777, backing.st_uid, backing.st_gid) == (0o640, 65534, 65534)
    assert (backing.st_atime_ns, backing.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.truncate(pool.path("b"), MiB)
    pool.path("c").write_bytes(b"c")
    reader = os.open(pool.path("c"), os.O_RDONLY)
    with closed_on_failure(reader):
        os.unlink(pool.path("c"))
        assert os.pread(reader, 1, 0) == b"c"  # open files survive unlink
    os.close(reader)
    assert sorted(os.listdir(pool.mountpoint)) == ["b"]
    assert rig.on_faulty_disk() == {"b": data[:MiB]}
    assert os.statvfs(rig.faulty.path).f_blocks == os.statvfs(rig.faulty.backing).f_blocks
    assert (rig.faulty.backing / ".fusestore" / "mark").is_file()
    assert "injected" not in rig.faulty.log()


# ------------------------------------------------------------- failed writes


# A new file whose write fails with EIO moves to another datadir, or is
# removed at close where its bytes cannot be read back: test_failing.py.


def test_new_file_whose_final_fsync_fails_is_removed_and_close_reports_eio(
    rig: FaultyPool,
) -> None:
    fd = os.open(rig.mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    with closed_on_failure(fd):
        assert os.write(fd, os.urandom(MiB)) == MiB
        rig.faulty.fail("fsync", INCOMING, "EIO")  # the fsync before publication, at close
    assert errno_of(lambda: os.close(fd)) == errno.EIO
    assert "injected EIO into fsync" in rig.faulty.log()
    rig.faulty.heal()
    assert rig.on_faulty_disk() == {}
    assert files_below(rig.other.path) == {}
    assert errno_of(lambda: os.stat(rig.mounted.path("image"))) == errno.ENOENT
    assert "removed incomplete new file 'image'" in rig.mounted.log()


def test_eacces_on_write_is_reported_and_the_file_kept(rig: FaultyPool) -> None:
    first = os.urandom(MiB)
    fd = os.open(rig.mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    with closed_on_failure(fd):
        assert os.write(fd, first) == MiB
        rig.faulty.fail("write", INCOMING, "EACCES")
        assert errno_of(lambda: os.write(fd, b"refused")) == errno.EACCES
    os.close(fd)  # no error: the file is published with what was written
    assert "injected EACCES into write" in rig.faulty.log()
    rig.faulty.heal()
    assert rig.on_faulty_disk() == {"image": first}
    assert files_below(rig.other.path) == {}
    assert rig.mounted.path("image").read_bytes() == first
    assert "removed" not in rig.mounted.log()


def test_existing_file_is_never_removed_on_a_write_error(rig: FaultyPool) -> None:
    old = os.urandom(MiB)
    rig.mounted.path("image").write_bytes(old)
    assert rig.on_faulty_disk() == {"image": old}
    rig.faulty.fail("write", "image", "EIO")
    fd = os.open(rig.mounted.path("image"), os.O_WRONLY)
    with closed_on_failure(fd):
        assert errno_of(lambda: os.pwrite(fd, b"new bytes", 0)) == errno.EIO
    os.close(fd)  # nothing to publish: no error
    assert "injected EIO into write of 'image'" in rig.faulty.log()
    assert rig.mounted.path("image").read_bytes() == old
    rig.faulty.heal()
    assert rig.on_faulty_disk() == {"image": old}
    assert rig.mounted.path("image").read_bytes() == old
    assert "removed" not in rig.mounted.log()


# -------------------------------------------------------------- broken disks


def test_a_name_whose_lookup_fails_answers_enoent_and_the_rest_works(rig: FaultyPool) -> None:
    (rig.faulty.path / "on-faulty").write_bytes(b"on the failing disk")
    (rig.other.path / "on-other").write_bytes(b"on the other disk")
    rig.faulty.fail("lookup", "on-faulty", "EIO")
    assert errno_of(lambda: os.stat(rig.faulty.path / "on-faulty")) == errno.EIO  # the disk
    assert errno_of(lambda: os.stat(rig.mounted.path("on-faulty"))) == errno.ENOENT
    assert (
        f"ERROR datadir {rig.faulty.path}: cannot look up 'on-faulty': Input/output error"
        in rig.mounted.log()
    )
    assert rig.mounted.path("on-other").read_bytes() == b"on the other disk"
    rig.mounted.path("new").write_bytes(b"placed as usual")  # the datadir itself is healthy
    assert rig.on_faulty_disk() == {"on-faulty": b"on the failing disk", "new": b"placed as usual"}
    rig.faulty.heal()
    assert eventually(rig.mounted.path("on-faulty").exists)
    assert rig.mounted.path("on-faulty").read_bytes() == b"on the failing disk"
    assert files_below(rig.other.path) == {"on-other": b"on the other disk"}


def test_a_datadir_failing_every_lookup_is_skipped_until_it_is_back(rig: FaultyPool) -> None:
    (rig.faulty.path / "on-faulty").write_bytes(b"on the failing disk")
    (rig.other.path / "on-other").write_bytes(b"on the other disk")
    rig.faulty.fail("lookup", "*", "EIO")
    assert errno_of(lambda: os.stat(rig.mounted.path("on-faulty"))) == errno.ENOENT
    assert rig.mounted.path("on-other").read_bytes() == b"on the other disk"
    rig.mounted.path("while-failing").write_bytes(b"elsewhere")
    assert files_below(rig.other.path) == {
        "on-other": b"on the other disk",
        "while-failing": b"elsewhere",
    }
    log = rig.mounted.log()
    assert f"ERROR datadir {rig.faulty.path}: cannot look up 'on-faulty'" in log
    assert f"ERROR datadir {rig.faulty.path} is missing" in log  # its mark cannot be seen
    rig.faulty.heal()
    assert eventually(rig.mounted.path("on-faulty").exists)
    assert rig.mounted.path("on-faulty").read_bytes() == b"on the failing disk"
    rig.mounted.path("after").write_bytes(b"back home")
    assert rig.on_faulty_disk() == {"on-faulty": b"on the failing disk", "after": b"back home"}
    assert f"datadir {rig.faulty.path} is back" in rig.mounted.log()


def test_a_file_whose_lookup_fails_is_never_replaced(rig: FaultyPool) -> None:
    """Unseen, the file's name looks free, so a new file of that name is written
    on its datadir; publishing it cannot replace the old one (README, *Never
    replaces*): the link(2) fails, with the disk's EIO (the kernel looks the
    name up first), close() reports it and the new bytes are kept aside."""
    (rig.faulty.path / "image").write_bytes(b"the original")
    rig.faulty.fail("lookup", "image", "EIO")
    fd = os.open(rig.mounted.path("image"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    with closed_on_failure(fd):
        assert os.write(fd, b"a newcomer") == 10
    assert errno_of(lambda: os.close(fd)) == errno.EIO
    assert "'image' could not be published" in rig.mounted.log()
    rig.faulty.heal()
    held = rig.on_faulty_disk()
    assert held.pop("image") == b"the original"
    [(kept, data)] = held.items()
    assert kept.startswith(".fusestore/kept/image.") and data == b"a newcomer"


@pytest.mark.parametrize("writer_too", [False, True], ids=["reader-alone", "with-a-writer"])
def test_handles_open_on_a_failing_disk_get_its_eio(
    faulty_datadir: FaultyFactory,
    tmpfs: TmpfsFactory,
    mount_pool: MountFactory,
    writer_too: bool,
) -> None:
    """A reader alone reads through FUSE passthrough where the kernel has it: the
    kernel reads the faultyfs file itself and the EIO comes from faultyfs without
    a READ reaching fusestore; with a writer, reads go through the daemon."""
    rig = make_rig(faulty_datadir, tmpfs, mount_pool, "--debug")
    data = os.urandom(2 * MiB)
    rig.mounted.path("image").write_bytes(data)
    fd = os.open(rig.mounted.path("image"), os.O_RDWR if writer_too else os.O_RDONLY)
    with closed_on_failure(fd):
        assert os.pread(fd, 4096, 0) == data[:4096]
        rig.faulty.fail("read", "image", "EIO")
        assert errno_of(lambda: os.pread(fd, 4096, MiB)) == errno.EIO
        rig.faulty.heal()
        assert os.pread(fd, 4096, MiB) == data[MiB : MiB + 4096]  # the same handle, healed
    os.close(fd)
    assert "injected EIO into read of 'image'" in rig.faulty.log()
    log = rig.mounted.log()
    assert "passthrough refused" not in log
    if "passthrough on" in log and not writer_too:
        assert " read(inode=" not in log  # the kernel read the faultyfs file itself
    else:
        assert " read(inode=" in log
    assert rig.on_faulty_disk() == {"image": data}


# ------------------------------------------------------------- the fixture


ORDER_TESTS = """
from tests.conftest import Datadir
from tests.faulty import faulty_datadir  # noqa: F401


def test_right_order(faulty_datadir, mount_pool):
    mount_pool([Datadir(faulty_datadir().path)]).path("file").write_bytes(b"x")


def test_wrong_order(mount_pool, faulty_datadir):
    mount_pool([Datadir(faulty_datadir().path)]).path("file").write_bytes(b"x")
"""


def test_faulty_datadirs_are_torn_down_after_the_pools_on_them(tmp_path: Path) -> None:
    """Requested before mount_pool, the fixture outlives the pool; requested
    after it, its finaliser fails the test (after cleaning up all the same)."""
    tests = tmp_path / "test_order.py"
    tests.write_text(ORDER_TESTS)
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    inner = subprocess.run(
        [
            *pytest_command,
            *("-p", "tests.conftest", f"--basetemp={tmp_path / 'inner'}", f"--rootdir={tmp_path}"),
            str(tests),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert inner.returncode == 1, inner.stdout + inner.stderr
    assert "2 passed, 1 error" in inner.stdout, inner.stdout  # the error: a teardown
    assert "ERROR at teardown of test_wrong_order" in inner.stdout
    assert "request faulty_datadir before mount_pool" in inner.stdout
    assert "/inner/" not in Path("/proc/self/mounts").read_text()


READER = """
import sys
try:
    open(sys.argv[1], "rb").read()
except OSError as exc:
    sys.exit(exc.errno)
"""


def test_a_stopped_faulty_datadir_is_still_torn_down(faulty_datadir: FaultyFactory) -> None:
    faulty = faulty_datadir()
    (faulty.path / "file").write_bytes(b"x")
    faulty.process.send_signal(signal.SIGSTOP)  # a hung disk
    reader = subprocess.Popen([sys.executable, "-c", READER, str(faulty.path / "file")])
    try:
        assert eventually(lambda: waits_for_fuse(reader.pid)), "the reader never blocked"
        assert reader.poll() is None
        faulty.stop()  # what the finaliser does
        assert faulty.process.returncode is not None
        assert not is_mounted(faulty.path)
        # Answered once resumed, or aborted by the unmount if that came first
        # (ECONNABORTED in flight, ENOTCONN after): which one is a race, but never a hang.
        assert reader.wait(timeout=5) in (0, errno.ECONNABORTED, errno.ENOTCONN)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
