"""Running fusestore as a system service: mount(8), fstab, systemd, config, status, check."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    MiB,
    TmpfsFactory,
    fusestore_command,
    is_mounted,
    mount_env,
    run_fusestore,
    wait_for_exit,
    wait_for_log,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


def readme_fstab_line() -> str:
    (line,) = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("/etc/fusestore/images.toml") and "fuse.fusestore" in line
    ]
    return line


def daemon_pid(mountpoint: Path) -> int:
    return int(status.read(str(mountpoint))["pid"])


@pytest.fixture
def two_datadirs(tmpfs: TmpfsFactory) -> list[Datadir]:
    return [Datadir(tmpfs("fast", 16), 200), Datadir(tmpfs("big", 64), 100)]


# ----------------------------------------------------------------- mount(8)


def test_readme_fstab_line_mounts_with_mount_T(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(tmp_path / "images.toml", datadirs=[d.spec for d in two_datadirs])
    fields = readme_fstab_line().split()
    fields[0], fields[1] = str(config), str(mountpoint)
    fstab = tmp_path / "fstab"
    fstab.write_text(" ".join(fields) + "\n")
    subprocess.run(["mount", "-T", str(fstab), str(mountpoint)], check=True, env=mount_env())
    assert is_mounted(mountpoint)
    pid = daemon_pid(mountpoint)
    source = tmp_path / "image.raw"
    source.write_bytes(os.urandom(2 * MiB))
    subprocess.run(["cp", str(source), str(mountpoint / "image")], check=True)
    assert (two_datadirs[0].path / "image").read_bytes() == source.read_bytes()
    df = subprocess.run(["df", str(mountpoint)], capture_output=True, text=True, check=True)
    assert df.stdout.splitlines()[1].split()[0] == str(config)  # the source, as in fstab
    subprocess.run(["rm", str(mountpoint / "image")], check=True)
    assert not (two_datadirs[0].path / "image").exists()
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert not is_mounted(mountpoint)
    assert wait_for_exit(pid)


def test_mount_t_with_datadir_list_source_and_pool_options(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    source = ",".join(d.spec for d in two_datadirs)
    options = "allow_other,_netdev,nofail,x-systemd.automount,min_free_space=16M,no_sync"
    subprocess.run(
        ["mount", "-t", "fuse.fusestore", source, str(mountpoint), "-o", options],
        check=True,
        env=mount_env(),
    )
    report = status.read(str(mountpoint))
    assert report["min_free_space"] == 16 * MiB and report["sync"] is False
    (mountpoint / "x").write_bytes(b"x")
    # The 16 MiB fast datadir is at the 16 MiB reserve: x goes to big.
    assert (two_datadirs[1].path / "x").exists()
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_unknown_mount_option_is_refused_by_libfuse(
    mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    result = subprocess.run(
        ["mount", "-t", "fuse.fusestore", two_datadirs[0].spec, str(mountpoint), "-o", "bogus"],
        capture_output=True,
        text=True,
        env=mount_env(),
        check=False,
    )
    assert result.returncode != 0
    assert "bogus" in result.stderr
    assert not is_mounted(mountpoint)


def test_bad_pool_option_names_the_value(mountpoint: Path, two_datadirs: list[Datadir]) -> None:
    result = run_fusestore(two_datadirs[0].spec, str(mountpoint), "-o", "min_free_space=lots")
    assert result.returncode == 2
    assert "'lots'" in result.stderr
    assert not is_mounted(mountpoint)


# ------------------------------------------------------------------ systemd


def test_shipped_units_pass_systemd_analyze_verify() -> None:
    units = [REPO / "systemd" / "fusestore@.service", REPO / "systemd" / "var-lib-images.mount"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    mount_unit = (REPO / "systemd" / "var-lib-images.mount").read_text()
    escaped = subprocess.run(
        ["systemd-escape", "-p", "--suffix=mount", "/var/lib/images"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert escaped == "var-lib-images.mount"
    assert "Type=fuse.fusestore" in mount_unit and "Where=/var/lib/images" in mount_unit


def test_notify_ready_only_once_the_mount_answers(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(tmp_path / "pool.toml", datadirs=[two_datadirs[0].spec])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    listener.bind(str(notify_path))
    listener.settimeout(15)
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        fusestore_command("mount", "--foreground", "--config", str(config), str(mountpoint)),
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        stdout=log,
        stderr=log,
    )
    try:
        message = listener.recv(4096).decode()
        mounted_at_ready = is_mounted(mountpoint)
        assert "READY=1" in message
        assert mounted_at_ready
        assert os.stat(mountpoint).st_dev != os.stat(mountpoint.parent).st_dev
        daemon.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in listener.recv(4096).decode()
        assert "READY=1" in listener.recv(4096).decode()
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert daemon.wait(timeout=20) == 0
        assert not is_mounted(mountpoint)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        listener.close()
        log.close()


# -------------------------------------------------------------- config file


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            'min_free_space = "1M"\ndatadirs = [\n  "/srv/a:1",\n  "/srv/b:high",\n]\n',
            [":4:", "datadirs", "'high'"],
        ),
        ('datadirs = ["/srv/a:1"]\nmin_free_spcae = "1G"\n', [":2:", "'min_free_spcae'"]),
        ('datadirs = ["/srv/a:1"]\n\nmin_free_space = "ten"\n', [":3:", "min_free_space", "'ten'"]),
        ('datadirs = "/srv/a:1"\n', [":1:", "datadirs", "a list of strings"]),
        ('datadirs = ["/srv/a:1"]\nno_sync = "yes"\n', [":2:", "no_sync", "true or false"]),
        ('datadirs = ["/srv/a:1"]\nmin_free_space = = 3\n', ["line 2"]),
        ('datadir = "/srv/a"\ndatadirs = ["/srv/b:1"]\n', [":2:", "not both"]),
    ],
    ids=["bad-priority", "unknown", "bad-size", "wrong-type", "bad-bool", "syntax", "both"],
)
def test_config_errors_name_file_line_and_setting(
    tmp_path: Path, mountpoint: Path, text: str, fragments: list[str]
) -> None:
    config = tmp_path / "images.toml"
    config.write_text(text)
    result = run_fusestore("mount", "--config", str(config), str(mountpoint))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not is_mounted(mountpoint)


def test_command_line_overrides_the_config_file(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    config = write_config(
        tmp_path / "pool.toml",
        datadirs=[two_datadirs[0].spec],
        min_free_space="1M",
        options=["allow_other"],
    )
    result = run_fusestore(
        "mount", "--config", str(config), "--min-free-space", "2M", "-o", "ro", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    report = status.read(str(mountpoint))
    assert report["min_free_space"] == 2 * MiB
    assert report["config_file"] == str(config)
    line = next(
        m for m in Path("/proc/self/mounts").read_text().splitlines() if str(mountpoint) in m
    )
    assert "allow_other" in line and " ro," in line


def test_metadata_file_is_checked_and_shown(
    tmp_path: Path, mountpoint: Path, two_datadirs: list[Datadir]
) -> None:
    metadata = tmp_path / "metadata.json"
    metadata.write_text('{"mountpoint": "/var/lib/images"}')
    args = ["--datadirs", two_datadirs[0].spec, "--metadata-file", str(metadata)]
    result = run_fusestore("mount", *args, str(mountpoint))
    assert result.returncode == 2 and "'id'" in result.stderr
    metadata.write_text('{"id": "store-1", "mountpoint": "/var/lib/images"}')
    result = run_fusestore("mount", *args, str(mountpoint))
    assert result.returncode == 0, result.stderr
    report = status.read(str(mountpoint))
    assert report["metadata"] == {"id": "store-1", "mountpoint": "/var/lib/images"}


# ------------------------------------------------------------------- reload


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
    with pytest.raises(OSError):  # new is at its reserve and old takes no new files
        (mountpoint / "nowhere").write_bytes(b"x")
    assert not (old.path / "nowhere").exists()


# ------------------------------------------------------------------- status


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


# -------------------------------------------------------------------- check


def test_check_finds_and_fixes_duplicates_and_leftovers(
    tmp_path: Path, two_datadirs: list[Datadir], mountpoint: Path
) -> None:
    fast, big = two_datadirs
    source = ",".join(d.spec for d in two_datadirs)
    assert run_fusestore(source, str(mountpoint)).returncode == 0
    (mountpoint / "image").write_bytes(b"winner")
    (big.path / "image").write_bytes(b"shadowed")  # planted duplicate
    dead = fast.path / ".fusestore" / "incoming" / "0123456789abcdef"
    dead.mkdir()
    (dead / "half-written").write_bytes(b"x" * 100)  # a crashed daemon's leftover
    (big.path / "stray-dir").mkdir()
    (big.path / "stray-link").symlink_to("/etc/passwd")
    # A writer that never forks: a fork's close-on-exec would publish its file.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644); "
            "os.write(fd, b'live'); print('written', flush=True); sys.stdin.read()",
            str(mountpoint / "in-progress"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    try:
        result = run_fusestore("check", str(mountpoint))
        assert result.returncode == 1
        out = result.stdout
        assert f"duplicate: 'image' in 2 datadirs; reads see {fast.path / 'image'}" in out
        assert f"leftover of an unfinished write: {dead / 'half-written'} (100 bytes)" in out
        assert f"ignored by the pool (directory): {big.path / 'stray-dir'}" in out
        assert f"ignored by the pool (symlink): {big.path / 'stray-link'}" in out
        assert "being written by a running daemon (fine)" in out

        fixed = run_fusestore("check", "--fix", source)
        assert f"removed shadowed duplicate {big.path / 'image'}" in fixed.stdout
        assert f"removed leftover {dead / 'half-written'}" in fixed.stdout
        assert fixed.returncode == 1  # the stray entries are for a person to judge
        assert (fast.path / "image").read_bytes() == b"winner"
        assert not (big.path / "image").exists()
        assert (big.path / "stray-link").is_symlink()
    finally:
        writer.communicate("", timeout=20)
    (big.path / "stray-dir").rmdir()
    (big.path / "stray-link").unlink()
    clean = run_fusestore("check", source)
    assert clean.returncode == 0, clean.stdout
    assert clean.stdout.strip().splitlines()[-1].startswith("clean")


def test_check_reports_unmarked_datadirs_and_kept_data(tmp_path: Path) -> None:
    datadir = tmp_path / "never-mounted"
    datadir.mkdir()
    kept = datadir / ".fusestore" / "kept"
    kept.mkdir(parents=True)
    (kept / "image.20260101T000000.abcd").write_bytes(b"lost race")
    result = run_fusestore("check", f"{datadir}:1")
    assert result.returncode == 1
    assert f"datadir without its mark (disk not mounted? never used?): {datadir}" in result.stdout
    assert "kept aside after a lost race" in result.stdout


# ------------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["mount", "status", "check", "SOURCE MOUNTPOINT"]),
        (["mount"], ["--config", "--no-sync", "--metadata-file", "min_free_space", "_netdev"]),
        (["status"], ["--json", "no-new-files"]),
        (["check"], ["--fix", "duplicates", "leftovers"]),
    ],
)
def test_every_command_explains_itself(command: list[str], expected: list[str]) -> None:
    result = run_fusestore(*command, "--help")
    assert result.returncode == 0
    text = re.sub(r"\s+", " ", result.stdout)
    for fragment in expected:
        assert fragment in text
