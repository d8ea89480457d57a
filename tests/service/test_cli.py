"""The ``fusestore mount`` command as people and scripts run it."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusestore import __version__
from fusestore.admin import status
from tests.conftest import (
    Datadir,
    MountFactory,
    TmpfsFactory,
    daemon_pid,
    fusestore_command,
    is_mounted,
    mount_options,
    mounted_source,
    run_fusestore,
    wait_for_exit,
    wait_for_log,
)


def assert_config_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_both_datadir_forms_is_refused(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore(
        "mount", "--datadir", str(tmp_path / "a"), "--datadirs", f"{tmp_path}/b:1", str(mountpoint)
    )
    assert_config_error(result, "--datadir", "not both")
    assert not is_mounted(mountpoint)


def test_no_datadir_is_refused(mountpoint: Path) -> None:
    assert_config_error(run_fusestore("mount", str(mountpoint)), "no datadir")
    assert not is_mounted(mountpoint)


def test_same_directory_twice_is_refused_by_name(tmp_path: Path, mountpoint: Path) -> None:
    a = tmp_path / "a"
    result = run_fusestore(
        "mount", "--datadirs", f"{a}:1", "--datadirs", f"{a}/:2", str(mountpoint)
    )
    assert_config_error(result, repr(str(a)), "twice")
    assert not is_mounted(mountpoint)


def test_same_directory_through_a_symlink_is_refused(tmp_path: Path, mountpoint: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    result = run_fusestore(
        "mount", "--datadirs", f"{real}:1", "--datadirs", f"{alias}:2", str(mountpoint)
    )
    assert_config_error(result, str(alias), "same directory", str(real))


def test_bad_priority_is_refused_by_value(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore("mount", "--datadirs", f"{tmp_path}/a:fast", str(mountpoint))
    assert_config_error(result, "'fast'", "priority")
    assert not (tmp_path / "a").exists()


def test_empty_path_is_refused(mountpoint: Path) -> None:
    assert_config_error(run_fusestore("mount", "--datadirs", ":5", str(mountpoint)), "empty path")
    assert_config_error(run_fusestore("mount", "--datadir", "", str(mountpoint)), "empty path")


def test_bad_min_free_space_is_refused_by_value(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore(
        "mount", "--datadir", str(tmp_path / "d"), "--min-free-space", "ten", str(mountpoint)
    )
    assert_config_error(result, "'ten'")


@pytest.mark.parametrize("form", [["--checksums", "md5,crc32"], ["-o", "checksums=md5:crc32"]])
def test_an_unknown_checksum_is_refused_by_name(
    tmp_path: Path, mountpoint: Path, form: list[str]
) -> None:
    result = run_fusestore("mount", "--datadir", str(tmp_path / "a"), *form, str(mountpoint))
    assert result.returncode == 2
    assert "checksum algorithm 'crc32' is not known" in result.stderr
    assert "sha256" in result.stderr  # what would do
    assert not (tmp_path / "a").exists()


def test_read_only_datadir_is_refused(tmpfs: TmpfsFactory, mountpoint: Path) -> None:
    readonly = tmpfs("ro", 4)
    subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
    result = run_fusestore("mount", "--datadirs", f"{readonly}:1", str(mountpoint))
    assert_config_error(result, repr(str(readonly)), "cannot be written", "Read-only")
    assert not is_mounted(mountpoint)


def test_datadir_that_is_a_file_is_refused(tmp_path: Path, mountpoint: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    result = run_fusestore("mount", "--datadir", str(tmp_path / "file"), str(mountpoint))
    assert_config_error(result, repr(str(tmp_path / "file")))


def test_missing_mountpoint_is_refused(tmp_path: Path) -> None:
    result = run_fusestore("mount", "--datadir", str(tmp_path / "d"), str(tmp_path / "nowhere"))
    assert_config_error(result, "mountpoint", "nowhere")


def test_mountpoint_that_is_a_regular_file_is_refused(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"left alone")
    result = run_fusestore("mount", "--datadir", str(tmp_path / "d"), str(not_a_directory))
    assert_config_error(result, repr(str(not_a_directory)), "not an existing directory")
    assert not is_mounted(not_a_directory)
    assert not_a_directory.read_bytes() == b"left alone"


@pytest.mark.parametrize("setting", ["datadir", "metadata_file"])
def test_a_relative_path_in_dash_o_is_refused_and_nothing_is_created(
    tmp_path: Path, mountpoint: Path, setting: str
) -> None:
    """README *Paths in a source*: mount(8) runs fusestore from any directory."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (workdir / "metadata.json").write_text('{"id": "store-1", "mountpoint": "/images"}')
    before = sorted(p.name for p in workdir.iterdir())
    relative = {"datadir": "rel", "metadata_file": "metadata.json"}[setting]
    args = ["-o", f"{setting}={relative}"]
    if setting != "datadir":
        args += ["--datadir", str(tmp_path / "ok")]
    result = run_fusestore("mount", *args, str(mountpoint), cwd=workdir)
    assert_config_error(result, repr(relative), "absolute path")
    assert not is_mounted(mountpoint)
    assert sorted(p.name for p in workdir.iterdir()) == before
    assert not (tmp_path / "ok").exists()


def test_a_relative_datadir_on_the_command_line_is_taken_from_the_current_directory(
    tmp_path: Path, mountpoint: Path
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = run_fusestore("mount", "--datadirs", "rel:1", str(mountpoint), cwd=workdir)
    assert result.returncode == 0, result.stderr
    try:
        rows = status.read(str(mountpoint))["datadirs"]
        assert [(row["path"], row["priority"]) for row in rows] == [(str(workdir / "rel"), 1)]
        (mountpoint / "image").write_bytes(b"landed")
        assert (workdir / "rel" / "image").read_bytes() == b"landed"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_fsname_option_is_the_mounts_source(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore(
        "mount", "--datadir", str(tmp_path / "d"), "-o", "fsname=custom", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    try:
        assert mounted_source(mountpoint) == "custom"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_log_file_is_appended_to(tmp_path: Path, mountpoint: Path) -> None:
    log_file = tmp_path / "daemon.log"
    log_file.write_text("an earlier line\n")
    args = ["--datadir", str(tmp_path / "d"), "--log-file", str(log_file)]
    result = run_fusestore("mount", *args, str(mountpoint))
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mountpoint)
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert wait_for_exit(pid)
    earlier, *lines = log_file.read_text().splitlines()
    assert earlier == "an earlier line"
    assert any(f" INFO mounted {mountpoint} with datadirs " in line for line in lines), lines
    assert lines[-1].endswith(f" INFO unmounted {mountpoint}")


def test_foreground_logs_to_stderr_and_nothing_to_stdout(tmp_path: Path, mountpoint: Path) -> None:
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        daemon = subprocess.Popen(
            fusestore_command("mount", "-f", "--datadir", str(tmp_path / "d"), str(mountpoint)),
            stdout=out,
            stderr=err,
        )
    try:
        wait_for_log(stderr, f"ready: {mountpoint} answers", seconds=30)
        (mountpoint / "x").write_bytes(b"x")
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
    assert stdout.read_bytes() == b""
    lines = stderr.read_text().splitlines()
    assert any(f" INFO mounted {mountpoint} with datadirs " in line for line in lines), lines
    assert lines[-1].endswith(f" INFO unmounted {mountpoint}")


def test_busy_poll_defaults_to_50_microseconds_on_more_than_one_cpu(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    """README: ``--busy-poll`` defaults to 50, 0 on one CPU; the mounted line says which."""
    expected = 50 if (os.cpu_count() or 1) > 1 else 0
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)])
    (line,) = [line for line in mounted.log().splitlines() if " INFO mounted " in line]
    assert f", busy_poll {expected} µs, " in line, line


def test_mount_returns_once_usable_and_creates_missing_datadirs(
    tmp_path: Path, mountpoint: Path
) -> None:
    fast, big = tmp_path / "new" / "fast", tmp_path / "new" / "big"
    result = run_fusestore(
        "mount", "--datadirs", f"{fast}:200", "--datadirs", f"{big}:100", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    assert is_mounted(mountpoint)  # no waiting: the command returned after mounting
    assert fast.is_dir() and big.is_dir()
    (mountpoint / "x").write_bytes(b"hello")
    assert (fast / "x").read_bytes() == b"hello"
    assert subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False).returncode == 0
    assert not is_mounted(mountpoint)


def test_failed_mount_exits_nonzero_with_the_reason(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore(
        "mount", "--datadir", str(tmp_path / "d"), "-o", "no_such_option", str(mountpoint)
    )
    assert result.returncode == 1
    assert "cannot mount" in result.stderr
    assert not is_mounted(mountpoint)


def test_fuse_options_reach_the_mount(tmp_path: Path, mountpoint: Path) -> None:
    result = run_fusestore(
        "mount", "--datadir", str(tmp_path / "d"), "-o", "allow_other,ro", str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    assert {"allow_other", "ro"} <= set(mount_options(mountpoint))
    with pytest.raises(OSError) as caught:
        (mountpoint / "x").write_bytes(b"refused on a read-only mount")
    assert caught.value.errno == errno.EROFS
    assert not (tmp_path / "d" / "x").exists()


# Every option of README's table, as ``fusestore mount --help`` shows it.
README_OPTIONS = (
    "--datadir PATH",
    "--datadirs PATH[:PRIORITY]",
    "--min-free-space SIZE",
    "-f, --foreground",
    "-o OPT[,OPT...]",
    "--no-sync",
    "--transport auto|io_uring|devfuse",
    "--no-io-uring",
    "--busy-poll MICROSECONDS",
    "--config FILE",
    "--metadata-file FILE",
    "--log-file PATH",
    "--debug",
)


def test_help_explains_every_option() -> None:
    result = subprocess.run(
        fusestore_command("mount", "--help"), capture_output=True, text=True, check=True
    )
    # Each option starts a line of its own, its explanation after two spaces or below.
    options = {
        re.split(r"\s{2,}", line.strip())[0]
        for line in result.stdout.splitlines()
        if line.startswith("  -")
    }
    assert set(README_OPTIONS) <= options, options
    assert "priority" in result.stdout and "fusermount3 -u" in result.stdout


def test_version() -> None:
    result = run_fusestore("--version")
    assert result.stdout.strip() == f"fusestore {__version__}"
    assert __version__ != "0+unknown"


def test_console_script_prints_the_same_help_as_the_module() -> None:
    script = Path(sys.executable).parent / "fusestore"  # the venv's bin, not the real python's
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: fusestore ")
    assert result.stdout == run_fusestore("--help").stdout


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
    assert result.stderr == ""
    assert result.stdout.startswith(" ".join(["usage: fusestore", *command]))
    text = re.sub(r"\s+", " ", result.stdout)
    for fragment in expected:
        assert fragment in text
