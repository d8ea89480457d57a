"""``fusestore status``: docs/operations.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    TmpfsFactory,
    daemon_pid,
    run_fusestore,
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
