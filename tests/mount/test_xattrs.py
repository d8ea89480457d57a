"""Extended attributes through the mount: README "Integrity", *Extended attributes*.

``user.*`` pass through to the backing file and move with it; the pool's own
``user.fusestore.*`` are read-only and answered by name but not listed;
other namespaces are not the pool's.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    errno_of,
    open_path_to,
    run_as_nobody,
)


def test_setfattr_and_getfattr_round_trip_on_the_backing_file(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    subprocess.run(["setfattr", "-n", "user.note", "-v", "x", str(target)], check=True)
    result = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.note", str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == "x"
    [holder] = pool.holders("image")
    assert os.getxattr(holder / "image", "user.note") == b"x"
    os.removexattr(target, "user.note")
    assert errno_of(os.getxattr, holder / "image", "user.note") == errno.ENODATA


def test_listing_shows_the_users_attributes_only(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    os.setxattr(target, "user.a", b"1")
    os.setxattr(target, "user.b", b"")
    assert os.getxattr(target, "user.fusestore.md5")  # the pool's exist, by name
    assert sorted(os.listxattr(target)) == ["user.a", "user.b"]


def test_create_and_replace_flags_behave_as_on_a_disk(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    assert errno_of(os.setxattr, target, "user.a", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(target, "user.a", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, target, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.removexattr, target, "user.missing") == errno.ENODATA


def test_the_pools_own_attributes_cannot_be_set_or_removed(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    md5 = os.getxattr(target, "user.fusestore.md5")
    for attribute in ("user.fusestore.md5", "user.fusestore.datadir", "user.fusestore.other"):
        assert errno_of(os.setxattr, target, attribute, b"0" * 32) == errno.EPERM
        assert errno_of(os.removexattr, target, attribute) == errno.EPERM
    assert os.getxattr(target, "user.fusestore.md5") == md5
    # Nor is the record the pool keeps on the backing file shown as it is.
    assert errno_of(os.getxattr, target, "user.fusestore.checksums") == errno.ENODATA


def test_other_namespaces_are_not_the_pools(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    assert errno_of(os.getxattr, target, "security.capability") == errno.ENODATA
    assert errno_of(os.setxattr, target, "trusted.x", b"1") == errno.EOPNOTSUPP
    assert errno_of(os.setxattr, target, "security.x", b"1") == errno.EOPNOTSUPP
    assert os.getxattr(target, "user.fusestore.md5")  # waits until the record is stored
    [holder] = pool.holders("image")
    assert os.listxattr(holder / "image") == ["user.fusestore.checksums"]


def test_a_value_larger_than_the_buffer_gets_erange(pool: MountedPool) -> None:
    target = pool.path("image")
    target.write_bytes(b"data")
    os.setxattr(target, "user.big", b"v" * 3000)
    assert os.getxattr(target, "user.big") == b"v" * 3000  # asks the size first
    probe = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "buffer = ctypes.create_string_buffer(10)\n"
        "n = libc.getxattr(sys.argv[1].encode(), b'user.big', buffer, 10)\n"
        "print(n, ctypes.get_errno())\n"
    )
    result = subprocess.run(
        ["python3", "-c", probe, str(target)], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["-1", str(errno.ERANGE)]


def test_cp_a_and_rsync_x_carry_user_attributes_but_not_the_pools(
    pool: MountedPool, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"data")
    os.setxattr(source, "user.origin", b"glance")
    subprocess.run(["cp", "-a", str(source), str(pool.path("copied"))], check=True)
    assert os.getxattr(pool.path("copied"), "user.origin") == b"glance"
    back = tmp_path / "back"
    result = subprocess.run(
        ["cp", "-a", str(pool.path("copied")), str(back)], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == ""
    assert os.listxattr(back) == ["user.origin"]
    # And from the pool into itself: no EPERM for the pool's own attributes.
    result = subprocess.run(
        ["cp", "-a", str(pool.path("copied")), str(pool.path("again"))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == ""
    assert os.getxattr(pool.path("again"), "user.origin") == b"glance"


def test_user_attributes_survive_rename_and_a_spill_over_move(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    small, large = Datadir(tmpfs("small", 8), 100), Datadir(tmpfs("large", 64), 50)
    mounted = mount_pool([small, large])
    target = mounted.path("image")
    target.write_bytes(b"start")
    subprocess.run(["setfattr", "-n", "user.note", "-v", "x", str(target)], check=True)
    os.rename(target, mounted.path("renamed"))
    target = mounted.path("renamed")
    assert mounted.holders("renamed") == [small.path]
    with open(target, "ab") as f:  # grows past the small datadir: moves while open
        f.write(os.urandom(12 * MiB))
    assert mounted.holders("renamed") == [large.path]
    assert os.getxattr(target, "user.note") == b"x"
    assert os.getxattr(large.path / "renamed", "user.note") == b"x"


def test_other_users_need_the_files_permissions_for_user_attributes(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    shared = mount_pool([Datadir(tmpfs("shared", 16))], "-o", "allow_other")
    open_path_to(shared.mountpoint)
    target = shared.path("image")
    target.write_bytes(b"data")
    os.chmod(target, 0o644)
    denied = run_as_nobody("setfattr", "-n", "user.x", "-v", "1", str(target))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    allowed = run_as_nobody("getfattr", "-n", "user.fusestore.md5", str(target))
    assert allowed.returncode == 0, allowed.stderr
    assert "user.fusestore.md5=" in allowed.stdout
    os.chmod(target, 0o666)
    granted = run_as_nobody("setfattr", "-n", "user.x", "-v", "1", str(target))
    assert granted.returncode == 0, granted.stderr
