"""``fusestore check``: docs/operations.md."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import (
    Datadir,
    incoming_files,
    run_fusestore,
    write_config,
)


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
    assert writer.returncode == 0
    # check --fix spared the live writer's file: its close() published it whole.
    assert (fast.path / "in-progress").read_bytes() == b"live"
    assert not (big.path / "in-progress").exists()
    assert (mountpoint / "in-progress").read_bytes() == b"live"
    assert incoming_files(fast) == incoming_files(big) == []
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


def test_check_of_a_config_file_reports_special_files_and_fix_keeps_kept_data(
    tmp_path: Path, two_datadirs: list[Datadir]
) -> None:
    fast, big = two_datadirs
    config = write_config(tmp_path / "pool.toml", datadirs=[d.spec for d in two_datadirs])
    for datadir in two_datadirs:  # as a mount would have left them
        (datadir.path / ".fusestore" / "kept").mkdir(parents=True)
        (datadir.path / ".fusestore" / "mark").write_text("{}")
    os.mkfifo(fast.path / "fifo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(big.path / "socket"))
    kept = big.path / ".fusestore" / "kept" / "image.20260101T000000.abcd"
    kept.write_bytes(b"lost race")
    try:
        result = run_fusestore("check", str(config))
        assert result.returncode == 1
        assert f"ignored by the pool (special file): {fast.path / 'fifo'}" in result.stdout
        assert f"ignored by the pool (special file): {big.path / 'socket'}" in result.stdout
        assert f"{kept}" in result.stdout and "kept aside after a lost race" in result.stdout
        fixed = run_fusestore("check", "--fix", str(config))
        assert fixed.returncode == 1
        assert kept.read_bytes() == b"lost race"  # never deleted by fusestore
        assert (fast.path / "fifo").exists() and (big.path / "socket").exists()
    finally:
        listener.close()
