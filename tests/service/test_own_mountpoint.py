"""The daemon never waits on its own mount.

README "How it behaves" → *The mountpoint is never a datadir*: a datadir that is the mountpoint,
lies below it or contains it (also through symlinks, from the command line,
``-o``, mount(8)'s source, a config file or a reload), and a config, metadata
or log file below it, are refused before anything is mounted or changed; and
nothing in the daemon's own process looks at its mountpoint once mounted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    TmpfsFactory,
    force_unmount,
    fusestore_command,
    is_mounted,
    mount_env,
    processes_naming,
    run_fusestore,
    wait_for_exit,
    wait_for_log,
    write_config,
)

REFUSAL_SECONDS = 10


# Each layout: the fusestore arguments for mountpoint M (in tmp_path), and the
# two paths the refusal must name.
Layout = Callable[[Path, Path], tuple[list[str], str, str]]


def _is_mountpoint(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    return ["mount", "--datadir", str(m), str(m)], f"'{m}'", f"'{m}'"


def _below(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    return ["mount", "--datadir", str(m / "sub"), str(m)], f"'{m / 'sub'}'", f"'{m}'"


def _through_symlink(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    (tmp / "link").symlink_to(m / "sub")
    return ["mount", "--datadirs", f"{tmp / 'link'}:1", str(m)], f"'{tmp / 'link'}'", f"'{m}'"


def _containing(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    return ["mount", "--datadir", str(tmp), str(m)], f"'{tmp}'", f"'{m}'"


def _in_dash_o(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    return ["mount", "-o", f"datadirs={m}/x:1", str(m)], f"'{m}/x'", f"'{m}'"


def _in_mount8_source(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    return [f"{tmp / 'ok'}:2,{m}/x:1", str(m)], f"'{m}/x'", f"'{m}'"


def _in_config_file(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    # Relative to the config file's directory: "mnt/sub" is M/sub.
    config = write_config(tmp / "pool.toml", datadirs=["mnt/sub:1"])
    return ["mount", "--config", str(config), str(m)], f"'{m / 'sub'}'", f"'{m}'"


def _log_file_inside(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    args = ["mount", "--datadir", str(tmp / "ok"), "--log-file", str(m / "log"), str(m)]
    return args, f"'{m / 'log'}'", f"'{m}'"


def _config_file_inside(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    # A good config in a bad place: only where it lies is wrong.
    config = write_config(m / "pool.toml", datadirs=[f"{tmp / 'ok'}:1"])
    return ["mount", "--config", str(config), str(m)], f"'{config}'", f"'{m}'"


def _metadata_file_inside(tmp: Path, m: Path) -> tuple[list[str], str, str]:
    metadata = m / "metadata.json"
    metadata.write_text('{"id": "store-1", "mountpoint": "/var/lib/images"}')
    args = ["mount", "--datadir", str(tmp / "ok"), "--metadata-file", str(metadata), str(m)]
    return args, f"'{metadata}'", f"'{m}'"


def tree(root: Path) -> list[str]:
    """Every path below ``root`` (symlinks not followed)."""
    return sorted(
        str(Path(directory, name).relative_to(root))
        for directory, directories, files in os.walk(root)
        for name in (*directories, *files)
    )


@pytest.mark.parametrize(
    "layout",
    [
        _is_mountpoint,
        _below,
        _through_symlink,
        _containing,
        _in_dash_o,
        _in_mount8_source,
        _in_config_file,
        _log_file_inside,
        _config_file_inside,
        _metadata_file_inside,
    ],
    ids=lambda layout: layout.__name__.strip("_"),
)
def test_a_pool_that_would_read_its_own_mount_is_refused(
    tmp_path: Path, mountpoint: Path, layout: Layout
) -> None:
    args, first, second = layout(tmp_path, mountpoint)
    before = tree(tmp_path)
    started = time.monotonic()
    result = run_fusestore(*args, timeout=REFUSAL_SECONDS)
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert first in line and second in line and "its own mount" in line
    assert not is_mounted(mountpoint)
    assert tree(tmp_path) == before  # nothing created, not even a datadir
    assert processes_naming(mountpoint) == []


def test_mount8_refuses_the_mountpoint_as_datadir(mountpoint: Path) -> None:
    result = subprocess.run(
        ["mount", "-t", "fuse.fusestore", f"{mountpoint}:0", str(mountpoint)],
        capture_output=True,
        text=True,
        env=mount_env(),
        timeout=REFUSAL_SECONDS,
        check=False,
    )
    assert result.returncode != 0
    assert f"'{mountpoint}' is the mountpoint '{mountpoint}'" in result.stderr
    assert not is_mounted(mountpoint)
    assert processes_naming(mountpoint) == []


def test_a_reload_into_the_mountpoint_is_rejected_and_the_pool_keeps_serving(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    datadir = Datadir(tmpfs("d", 16), 1)
    config = write_config(tmp_path / "pool.toml", datadirs=[datadir.spec])
    log_file = tmp_path / "daemon.log"
    args = ["mount", "--config", str(config), "--log-file", str(log_file), str(mountpoint)]
    assert run_fusestore(*args).returncode == 0
    pid = int(status.read(str(mountpoint))["pid"])
    for count, datadirs in enumerate(([datadir.spec, f"{mountpoint}/sub:2"], [f"{tmp_path}:2"])):
        write_config(config, datadirs=datadirs)
        os.kill(pid, signal.SIGHUP)
        wait_for_log(log_file, "reload rejected", count=count + 1)
    rejected = [line for line in log_file.read_text().splitlines() if "reload rejected" in line]
    assert f"'{mountpoint}/sub' lies inside the mountpoint '{mountpoint}'" in rejected[0]
    assert f"mountpoint '{mountpoint}' lies inside datadir '{tmp_path}'" in rejected[1]
    (mountpoint / "after").write_bytes(b"still served")
    assert datadir.names() == {"after"}
    assert [row["path"] for row in status.read(str(mountpoint))["datadirs"]] == [str(datadir.path)]
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_the_daemon_never_looks_at_its_own_mountpoint(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    """Once mounted, no system call of the daemon's process names the mountpoint
    but the unmount: mounting, requests, status, a reload and shutdown included
    (the READY check is a child process for this reason)."""
    datadir = Datadir(tmpfs("d", 16), 1)
    config = write_config(tmp_path / "pool.toml", datadirs=[datadir.spec])
    trace, log_file = tmp_path / "trace", tmp_path / "daemon.log"
    daemon = fusestore_command("mount", "-f", "--config", str(config), str(mountpoint))
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace), *daemon],
            stdout=log,
            stderr=log,
        )
    try:
        wait_for_log(log_file, "ready", seconds=30)
        (mountpoint / "image").write_bytes(b"x")
        assert os.listdir(mountpoint) == ["image"]
        os.rename(mountpoint / "image", mountpoint / "renamed")
        assert run_fusestore("status", str(mountpoint)).returncode == 0
        os.kill(int(status.read(str(mountpoint))["pid"]), signal.SIGHUP)
        wait_for_log(log_file, "reloaded")
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert process.wait(timeout=30) == 0
    finally:
        force_unmount(mountpoint)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    named = f'"{mountpoint}'
    lines = trace.read_text().splitlines()
    ready_check = {line.split()[0] for line in lines if "execve(" in line and '"-c"' in line}
    (mounted_at,) = [i for i, line in enumerate(lines) if ' mount("' in line and named in line]
    touched = [
        line
        for line in lines[mounted_at + 1 :]
        if named in line and line.split()[0] not in ready_check and "umount2(" not in line
    ]
    assert touched == []


def test_a_busy_mountpoint_does_not_hold_up_shutdown(
    tmp_path: Path, mountpoint: Path, tmpfs: TmpfsFactory
) -> None:
    """A program sitting in the mount (its working directory, an open file)
    does not keep SIGTERM from ending the daemon: the unmount is lazy."""
    datadir = Datadir(tmpfs("d", 16), 1)
    assert run_fusestore("mount", "--datadirs", datadir.spec, str(mountpoint)).returncode == 0
    pid = int(status.read(str(mountpoint))["pid"])
    (mountpoint / "held").write_bytes(b"open")
    sitter = subprocess.Popen(["sh", "-c", "exec 3<held; exec sleep 60"], cwd=mountpoint)
    try:
        deadline = time.monotonic() + 10
        while not any(
            os.readlink(fd).startswith(str(mountpoint))
            for fd in Path(f"/proc/{sitter.pid}/fd").iterdir()
        ):
            assert time.monotonic() < deadline, "the sitter never opened the file"
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid, seconds=10)
        assert not is_mounted(mountpoint)
    finally:
        sitter.kill()
        sitter.wait(timeout=10)
    assert (datadir.path / "held").read_bytes() == b"open"
