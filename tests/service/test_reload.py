"""Reload on SIGHUP: README "Running it as a service", *Reload*."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    MiB,
    TmpfsFactory,
    daemon_pid,
    run_fusestore,
    wait_for_log,
    write_config,
)


def test_sighup_reloads_datadirs_priorities_and_reserve(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    old, new = Datadir(tmpfs("old", 16), 10), Datadir(tmpfs("new", 16), 20)
    config = write_config(tmp_path / "pool.toml", datadirs=[old.spec])
    log_file = tmp_path / "daemon.log"
    args = ["mount", "--config", str(config), "--log-file", str(log_file), str(mountpoint)]
    assert run_fusestore(*args).returncode == 0
    pid = daemon_pid(mountpoint)
    (mountpoint / "before").write_bytes(b"1")
    assert old.names() == {"before"}

    write_config(config, datadirs=[old.spec, new.spec])
    os.kill(pid, signal.SIGHUP)
    wait_for_log(log_file, "reloaded")
    (mountpoint / "after-add").write_bytes(b"2")
    assert new.names() == {"after-add"}
    assert (new.path / ".fusestore" / "mark").is_file()

    write_config(config, datadirs=[new.spec, "/bad:priority"])
    os.kill(pid, signal.SIGHUP)
    wait_for_log(log_file, "reload rejected")
    assert "'priority'" in log_file.read_text()
    (mountpoint / "after-bad").write_bytes(b"3")
    assert new.names() == {"after-add", "after-bad"}  # the old settings still apply

    write_config(config, datadirs=[f"{new.path}:0"], min_free_space="16M")
    os.kill(pid, signal.SIGHUP)
    wait_for_log(log_file, "reloaded", count=2)
    report = status.read(str(mountpoint))
    rows = {row["path"]: row for row in report["datadirs"]}
    assert rows[str(old.path)]["state"] == "no-new-files"
    assert rows[str(new.path)]["priority"] == 0
    assert report["min_free_space"] == 16 * MiB
    assert (mountpoint / "before").read_bytes() == b"1"  # still visible and usable
    with pytest.raises(OSError) as caught:  # new is at its reserve, old takes no new files
        (mountpoint / "nowhere").write_bytes(b"x")
    assert caught.value.errno == errno.ENOSPC
    assert not (old.path / "nowhere").exists()


def test_a_reload_reorders_datadirs_and_new_priorities_place_the_next_file(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    """Datadirs of one priority are looked up, and tie, in the config's order,
    also after a reload; a changed priority places the very next new file."""
    a, b = tmpfs("a", 16), tmpfs("b", 16)
    (a / "both").write_bytes(b"from a")
    (b / "both").write_bytes(b"from b")
    config = write_config(tmp_path / "pool.toml", datadirs=[f"{a}:5", f"{b}:5"])
    log_file = tmp_path / "daemon.log"
    args = ["mount", "--config", str(config), "--log-file", str(log_file), str(mountpoint)]
    assert run_fusestore(*args).returncode == 0
    pid = daemon_pid(mountpoint)
    assert (mountpoint / "both").read_bytes() == b"from a"

    write_config(config, datadirs=[f"{b}:5", f"{a}:5"])
    os.kill(pid, signal.SIGHUP)
    wait_for_log(log_file, "reloaded")
    assert (mountpoint / "both").read_bytes() == b"from b"
    assert [row["path"] for row in status.read(str(mountpoint))["datadirs"]] == [str(b), str(a)]

    write_config(config, datadirs=[f"{b}:5", f"{a}:9"])
    os.kill(pid, signal.SIGHUP)
    wait_for_log(log_file, "reloaded", count=2)
    (mountpoint / "next").write_bytes(b"placed by the new priority")
    assert (a / "next").read_bytes() == b"placed by the new priority"
    assert not (b / "next").exists()


def test_a_reload_changes_the_checksums_of_the_next_new_files(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    datadir = Datadir(tmpfs("only", 16))
    config = write_config(tmp_path / "pool.toml", datadirs=[datadir.spec])
    log_file = tmp_path / "daemon.log"
    args = ["mount", "--config", str(config), "--log-file", str(log_file), str(mountpoint)]
    assert run_fusestore(*args).returncode == 0
    (mountpoint / "before").write_bytes(b"1")
    assert os.getxattr(mountpoint / "before", "user.fusestore.md5")

    write_config(config, datadirs=[datadir.spec], checksums=["sha512"])
    os.kill(daemon_pid(mountpoint), signal.SIGHUP)
    wait_for_log(log_file, "reloaded")
    assert "checksums sha512" in log_file.read_text()
    (mountpoint / "after").write_bytes(b"2")
    assert os.getxattr(mountpoint / "after", "user.fusestore.sha512").decode() == (
        hashlib.sha512(b"2").hexdigest()
    )
    with pytest.raises(OSError) as caught:
        os.getxattr(mountpoint / "after", "user.fusestore.md5")
    assert caught.value.errno == errno.ENODATA
    # Files checksummed before keep what they have.
    assert os.getxattr(mountpoint / "before", "user.fusestore.md5").decode() == (
        hashlib.md5(b"1").hexdigest()
    )
