"""Checksums computed for new files: README "Integrity", *Checksums*.

Every new file gets md5 and sha256 (the default) computed after it is
published and stored on the backing file; through the mount they read as
``user.fusestore.md5`` / ``.sha256``. Whatever the pattern of writes, a
checksum shown is one of the bytes as they are: rewrites, truncation and
changes behind the pool's back make it go (until computed again), never
wrong.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    eventually,
)
from tests.faulty import FaultyFactory

RECORD = "user.fusestore.checksums"


def getfattr(path: Path, attribute: str) -> str:
    """The value getfattr(1) prints for one attribute."""
    result = subprocess.run(
        ["getfattr", "--only-values", "-n", attribute, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def digest_of(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def checksum(path: Path, algorithm: str) -> str:
    return os.getxattr(path, f"user.fusestore.{algorithm}").decode()


def has_no_checksum(path: Path) -> bool:
    """True when the pool shows no checksum (ENODATA); any other error fails the test."""
    try:
        os.getxattr(path, "user.fusestore.sha256")
    except OSError as exc:
        assert exc.errno == errno.ENODATA, exc
        return True
    return False


def test_cp_of_64mib_gets_md5_and_sha256_that_md5sum_and_sha256sum_agree_with(
    pool: MountedPool, tmp_path: Path
) -> None:
    source = tmp_path / "image"
    source.write_bytes(os.urandom(64 * MiB))
    target = pool.path("image")
    subprocess.run(["cp", str(source), str(target)], check=True, timeout=60)
    md5 = subprocess.run(["md5sum", str(source)], capture_output=True, text=True, check=True)
    sha256 = subprocess.run(["sha256sum", str(source)], capture_output=True, text=True, check=True)
    assert getfattr(target, "user.fusestore.md5") == md5.stdout.split()[0]
    assert getfattr(target, "user.fusestore.sha256") == sha256.stdout.split()[0]
    [holder] = pool.holders("image")
    assert getfattr(target, "user.fusestore.datadir") == str(holder)
    assert getfattr(target, "user.fusestore.path") == str(holder / "image")
    # Kept on the backing file, with the stamp of the bytes it belongs to.
    record = os.getxattr(holder / "image", RECORD).decode()
    assert f"size={64 * MiB} " in record
    assert f"mtime_ns={os.stat(holder / 'image').st_mtime_ns} " in record


def test_fio_random_writes_never_show_a_checksum_sha256sum_disagrees_with(
    pool: MountedPool,
) -> None:
    target = pool.path("random")
    result = subprocess.run(
        [
            "fio",
            "--name=random",
            f"--filename={target}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--io_size=16M",  # writes some blocks twice, leaves others as holes
            "--randrepeat=0",
            "--ioengine=psync",
            "--output=/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = subprocess.run(
        ["sha256sum", str(target)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert checksum(target, "sha256") == expected


def test_writes_in_any_order_through_os_calls_give_the_checksum_of_the_final_bytes(
    pool: MountedPool,
) -> None:
    target = pool.path("scattered")
    chunks = list(range(64))
    random.shuffle(chunks)
    fd = os.open(target, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for index in chunks:
            os.pwrite(fd, bytes([index]) * 65536, index * 65536)
        os.pwrite(fd, b"rewritten", 12345)  # over bytes written before
        os.ftruncate(fd, 63 * 65536 + 7)
    finally:
        os.close(fd)
    data = (pool.path("scattered")).read_bytes()
    assert checksum(target, "md5") == hashlib.md5(data).hexdigest()
    assert checksum(target, "sha256") == hashlib.sha256(data).hexdigest()


def test_a_rewrite_drops_the_checksum_while_open_and_checksums_the_new_bytes_after(
    pool: MountedPool,
) -> None:
    target = pool.path("image")
    target.write_bytes(b"a" * MiB)
    old = checksum(target, "sha256")
    with open(target, "r+b") as f:
        assert has_no_checksum(target)  # it may change from now on
        f.seek(100)
        f.write(b"changed")
    assert checksum(target, "sha256") == digest_of(target, "sha256") != old


def test_truncate_and_o_trunc_checksum_the_new_contents(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(os.urandom(MiB))
    os.truncate(target, 1000)
    assert checksum(target, "sha256") == hashlib.sha256(target.read_bytes()[:1000]).hexdigest()
    target.write_bytes(b"shorter")  # open(O_TRUNC) and write
    assert checksum(target, "md5") == hashlib.md5(b"shorter").hexdigest()


def test_changing_times_rename_and_chmod_keep_the_checksum(pool: MountedPool) -> None:
    """rsync writes a temporary name, closes it, sets its times and renames it."""
    temporary, final = pool.path(".image.XyZ"), pool.path("image")
    data = os.urandom(2 * MiB)
    temporary.write_bytes(data)
    os.utime(temporary, ns=(1_000_000_000, 2_000_000_000))
    os.chmod(temporary, 0o640)
    os.rename(temporary, final)
    assert checksum(final, "sha256") == hashlib.sha256(data).hexdigest()
    [holder] = pool.holders("image")
    assert "mtime_ns=2000000000 " in os.getxattr(holder / "image", RECORD).decode()
    subprocess.run(["touch", str(final)], check=True)
    assert checksum(final, "md5") == hashlib.md5(data).hexdigest()


def test_a_file_changed_behind_the_pools_back_shows_no_checksum_not_a_wrong_one(
    pool: MountedPool,
) -> None:
    target = pool.path("image")
    target.write_bytes(b"x" * MiB)
    assert checksum(target, "md5") == hashlib.md5(b"x" * MiB).hexdigest()
    [holder] = pool.holders("image")
    with open(holder / "image", "r+b") as f:  # directly in the datadir
        f.write(b"y")
    assert has_no_checksum(target)
    assert errno_of(os.getxattr, target, "user.fusestore.md5") == errno.ENODATA


def test_checksum_setting_chooses_the_algorithms_or_turns_them_off(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    sha512 = mount_pool([Datadir(tmpfs("a", 16))], "--checksums", "sha512")
    none = mount_pool([Datadir(tmpfs("b", 16))], "-o", "checksums=none")
    for mounted in (sha512, none):
        mounted.path("image").write_bytes(b"data")
    assert checksum(sha512.path("image"), "sha512") == hashlib.sha512(b"data").hexdigest()
    assert errno_of(os.getxattr, sha512.path("image"), "user.fusestore.md5") == errno.ENODATA
    assert has_no_checksum(none.path("image"))
    [holder] = none.holders("image")
    assert errno_of(os.getxattr, holder / "image", RECORD) == errno.ENODATA


def test_a_file_that_spills_over_is_checksummed_where_it_lands(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 8), 100), Datadir(tmpfs("large", 64), 50)
    mounted = mount_pool([small, large])
    data = os.urandom(12 * MiB)
    mounted.path("image").write_bytes(data)
    assert mounted.holders("image") == [large.path]
    assert checksum(mounted.path("image"), "sha256") == hashlib.sha256(data).hexdigest()
    assert getfattr(mounted.path("image"), "user.fusestore.datadir") == str(large.path)


def test_a_datadir_without_user_xattrs_keeps_working_without_checksums(
    faulty_datadir: FaultyFactory, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    faulty = faulty_datadir()  # faultyfs answers no extended attributes
    mounted = mount_pool([Datadir(faulty.path, 100), Datadir(tmpfs("other", 16), 50)])
    mounted.path("image").write_bytes(b"data")
    assert mounted.path("image").read_bytes() == b"data"
    assert mounted.holders("image") == [faulty.path]
    assert has_no_checksum(mounted.path("image"))
    assert errno_of(os.setxattr, mounted.path("image"), "user.note", b"x") == errno.EOPNOTSUPP
    assert f"datadir {faulty.path} keeps no user extended attributes" in mounted.log()


def test_checksums_of_files_written_while_the_worker_is_busy_all_arrive(
    pool: MountedPool,
) -> None:
    """Many files at once queue up; each gets its own bytes' checksum."""
    contents = {f"file{i}": os.urandom(256 * 1024 + i) for i in range(40)}
    for name, data in contents.items():
        pool.path(name).write_bytes(data)
    assert eventually(lambda: all(not has_no_checksum(pool.path(n)) for n in contents))
    for name, data in contents.items():
        assert checksum(pool.path(name), "md5") == hashlib.md5(data).hexdigest()


def test_writes_through_a_descriptor_that_outlives_the_first_close_are_checksummed(
    pool: MountedPool,
) -> None:
    """The file is published at the first close and taken back by the next write."""
    script = 'exec 3>"$1"; printf first >&3; exec 4>&3; exec 3>&-; printf " second" >&4'
    subprocess.run(["sh", "-c", script, "sh", str(pool.path("image"))], check=True, timeout=30)
    assert pool.path("image").read_bytes() == b"first second"
    assert checksum(pool.path("image"), "md5") == hashlib.md5(b"first second").hexdigest()
