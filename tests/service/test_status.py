"""``fusestore status``: docs/operations.md."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from fusestore.admin import status
from fusestore.pool import checksums
from tests.conftest import (
    Datadir,
    MountFactory,
    TmpfsFactory,
    daemon_pid,
    run_fusestore,
    wait_for_exit,
)


def test_status_json_matches_the_datadirs(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    fast, big = two_datadirs
    source = ",".join(d.spec for d in two_datadirs)
    assert run_fusestore(source, str(mountpoint), "-o", "min_free_space=14M").returncode == 0
    (mountpoint / "a").write_bytes(b"x" * 1000)
    (mountpoint / "b").write_bytes(b"y" * 3000)  # fast is now at its reserve
    (big.path / "direct").write_bytes(b"z" * 500)
    result = run_fusestore("status", "--json", str(mountpoint))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["path"]: row for row in report["datadirs"]}
    for datadir in two_datadirs:
        row = rows[str(datadir.path)]
        files = [datadir.path / name for name in datadir.names()]
        assert row["files"] == len(files)
        assert row["file_bytes"] == sum(f.stat().st_size for f in files)
        assert row["priority"] == datadir.priority
        vfs = os.statvfs(datadir.path)
        assert row["size_bytes"] == vfs.f_blocks * vfs.f_frsize
        assert abs(row["free_bytes"] - vfs.f_bavail * vfs.f_frsize) <= 64 * 1024
    assert report["totals"]["files"] == 3 and report["totals"]["names"] == 3
    # Two filesystems of 16 and 64 MiB: the totals are what df of the mount shows.
    mounted_vfs = os.statvfs(mountpoint)
    assert report["totals"]["size_bytes"] == mounted_vfs.f_blocks * mounted_vfs.f_frsize
    assert abs(report["totals"]["size_bytes"] - 80 * 1024 * 1024) <= 8192
    assert report["pid"] == daemon_pid(mountpoint)

    table = run_fusestore("status", str(mountpoint)).stdout
    assert str(fast.path) in table and str(big.path) in table and "PRIORITY" in table


def test_status_reports_full_read_only_and_missing(
    ext4, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    disk = ext4("disk", 32)
    full = Datadir(tmpfs("full", 8), 5)
    gone = Datadir(tmpfs("gone", 8), 1)
    source = f"{disk.path}:10,{full.spec},{gone.spec}"
    assert run_fusestore(source, str(mountpoint), "-o", "min_free_space=9M").returncode == 0
    disk.remount("ro")
    (gone.path / ".fusestore" / "mark").unlink()
    states = {r["path"]: r["state"] for r in status.read(str(mountpoint))["datadirs"]}
    assert states == {
        str(disk.path): "read-only",
        str(full.path): "full",
        str(gone.path): "missing",
    }
    disk.remount("rw")


def test_status_of_something_else_is_a_clear_error(tmp_path: Path) -> None:
    result = run_fusestore("status", str(tmp_path))
    assert result.returncode == 1
    assert "not a fusestore mount" in result.stderr


def test_status_is_versioned_and_answers_on_the_documented_socket(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    assert (
        run_fusestore("mount", "--datadirs", two_datadirs[0].spec, str(mountpoint)).returncode == 0
    )
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:32]
    path = Path("/run/fusestore") / f"{digest}.sock"
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o666
    report = json.loads(run_fusestore("status", "--json", str(mountpoint)).stdout)
    assert report["version"] == 1
    assert [row["state"] for row in report["datadirs"]] == ["ok"]
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert wait_for_exit(report["pid"])
    assert not path.exists()  # removed when the daemon ends


def test_a_datadir_whose_directory_is_gone_is_vanished(tmp_path: Path, mountpoint: Path) -> None:
    kept, doomed = tmp_path / "kept", tmp_path / "doomed"
    assert run_fusestore(f"{kept}:2,{doomed}:1", str(mountpoint)).returncode == 0
    shutil.rmtree(doomed)
    states = {r["path"]: r["state"] for r in status.read(str(mountpoint))["datadirs"]}
    assert states == {str(kept): "ok", str(doomed): "vanished"}
    (mountpoint / "still").write_bytes(b"works")
    assert (kept / "still").read_bytes() == b"works"


def test_totals_count_a_filesystem_shared_by_datadirs_once(
    mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    shared = tmpfs("shared", 32)
    halves = [shared / "a", shared / "b"]
    assert run_fusestore(f"{halves[0]}:1,{halves[1]}:1", str(mountpoint)).returncode == 0
    report = status.read(str(mountpoint))
    vfs = os.statvfs(shared)
    assert report["totals"]["size_bytes"] == vfs.f_blocks * vfs.f_frsize  # not twice
    assert [row["size_bytes"] for row in report["datadirs"]] == [vfs.f_blocks * vfs.f_frsize] * 2
    df = os.statvfs(mountpoint)
    assert df.f_blocks * df.f_frsize == vfs.f_blocks * vfs.f_frsize


def test_status_shows_checksums_and_the_last_verify(
    two_datadirs: list[Datadir], mount_pool: MountFactory
) -> None:
    fast, big = two_datadirs
    mounted = mount_pool(two_datadirs)
    report = status.read(str(mounted.mountpoint))
    assert report["checksums"] == ["md5", "sha256"]  # the default
    assert isinstance(report["checksums_pending"], int) and report["checksums_pending"] >= 0
    assert [(r["checksums"], r["last_verify"]) for r in report["datadirs"]] == [("on", None)] * 2

    for name in ("a", "b", "damaged"):
        (big.path / name).write_bytes(os.urandom(10_000))
        path = str(big.path / name)
        digests = {
            a: hashlib.new(a, Path(path).read_bytes()).hexdigest() for a in ("md5", "sha256")
        }
        checksums.write_record(path, checksums.Record(checksums.Stamp.of(os.stat(path)), digests))
    (big.path / "plain").write_bytes(b"no checksum")
    damaged = big.path / "damaged"
    st = damaged.stat()
    damaged.write_bytes(b"X" + damaged.read_bytes()[1:])
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify = run_fusestore("verify", "--datadir", str(big.path), str(mounted.mountpoint))
    assert verify.returncode == 1, verify.stdout

    report = status.read(str(mounted.mountpoint))
    rows = {row["path"]: row for row in report["datadirs"]}
    assert rows[str(fast.path)]["last_verify"] is None
    last = rows[str(big.path)]["last_verify"]
    assert last.pop("time").startswith(str(datetime.date.today().year))
    assert last == {
        "files": 4,
        "verified": 2,
        "unverified": 1,
        "corrupt": 1,
        "changed": 0,
        "unreadable": 0,
    }

    table = run_fusestore("status", str(mounted.mountpoint)).stdout.splitlines()
    assert table[0].split()[-1] == "VERIFIED"
    line_of = {line.split()[0]: line for line in table[1:3]}
    assert line_of[str(fast.path)].endswith("  never")
    assert re.search(
        r"  2 ok, 1 unverified, 1 corrupt \(\d{4}-\d\d-\d\d\)$", line_of[str(big.path)]
    )
    assert re.fullmatch(r"checksums md5, sha256, \d+ file\(s\) pending", table[-1])


def test_status_says_which_datadirs_keep_no_checksums(
    ramfs: Callable[[str], Path], tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    bare = Datadir(ramfs("bare"), 1)  # keeps no user extended attributes
    mounted = mount_pool([Datadir(tmpfs("good", 16), 2), bare])
    rows = status.read(str(mounted.mountpoint))["datadirs"]
    assert [row["checksums"] for row in rows] == ["on", "no user xattrs"]
    table = run_fusestore("status", str(mounted.mountpoint)).stdout
    assert re.search(rf"^{re.escape(str(bare.path))} .*  no user xattrs$", table, re.MULTILINE)


def test_status_says_when_checksums_are_off(
    two_datadirs: list[Datadir], mount_pool: MountFactory
) -> None:
    mounted = mount_pool(two_datadirs, "--checksums", "none")
    report = status.read(str(mounted.mountpoint))
    assert report["checksums"] == []
    assert [row["checksums"] for row in report["datadirs"]] == ["off", "off"]
    assert run_fusestore("status", str(mounted.mountpoint)).stdout.splitlines()[-1] == (
        "checksums off"
    )
