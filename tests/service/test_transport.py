"""The ``transport`` setting: README *Usage*, docs/design.md *Choices*.

By default (``auto``) the daemon times ``stat`` through FUSE over io_uring
and through ``/dev/fuse`` on a probe mount before mounting the pool, and
takes the faster; the log and ``status`` say which runs, why, and the
figures. The rest of the suite names its run's transport instead
(``tests/conftest.py``), so these are the tests that pay for the probe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fusestore.fuse import transport, uring
from tests.conftest import (
    Datadir,
    MountFactory,
    TmpfsFactory,
    daemon_pid,
    is_mounted,
    run_fusestore,
    wait_for_exit,
    wait_for_log,
    write_config,
)

_LOG_LINE = re.compile(
    r" INFO requests through (io_uring|/dev/fuse): measured ([\d,]+) stats/s vs ([\d,]+) "
    r"through (io_uring|/dev/fuse) at mount(?:, within the \d+% noise margin, where io_uring "
    r"is kept)? \(probe ([\d.]+) s\)"
)
_NAMES = {"io_uring": "io_uring", "/dev/fuse": "devfuse"}


def status_of(mountpoint: Path) -> dict:
    result = run_fusestore("status", "--json", str(mountpoint), timeout=10)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mounts_under(directory: Path) -> list[str]:
    """Mount points in or below ``directory``."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in mounts if line.split()[4].startswith(f"{directory}/")]


def mount_by_default(datadir: Path, mountpoint: Path, log: Path, **env: str) -> None:
    """``fusestore mount`` as a user types it: no transport named (the harness
    would name its run's)."""
    command = [sys.executable, "-m", "fusestore", "mount", "--datadir", str(datadir)]
    command += ["--log-file", str(log), str(mountpoint)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(
    not uring.ENABLE_PARAMETER.exists(), reason="this kernel has no FUSE over io_uring"
)
def test_by_default_the_faster_transport_is_measured_at_mount_and_reported(
    tmp_path: Path, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    log, private = tmp_path / "daemon.log", tmp_path / "tmp"
    private.mkdir()  # where the daemon makes its probe mounts' directories
    mount_by_default(tmpfs("d", 8), mountpoint, log, TMPDIR=str(private))
    pid = daemon_pid(mountpoint)
    (line,) = [match for match in map(_LOG_LINE.search, log.read_text().splitlines()) if match]
    chosen, chosen_rate, other_rate, other, seconds = line.groups()
    assert chosen != other
    rates = {
        _NAMES[chosen]: int(chosen_rate.replace(",", "")),
        _NAMES[other]: int(other_rate.replace(",", "")),
    }
    assert all(rate > 1000 for rate in rates.values()), rates
    # io_uring unless /dev/fuse was faster beyond the noise margin.
    assert (_NAMES[chosen] == "io_uring") == (
        rates["io_uring"] >= rates["devfuse"] * (1 - transport.NOISE)
    )
    assert float(seconds) < 1.0  # the probe's whole cost at mount

    report = status_of(mountpoint)["transport"]
    assert report["chosen"] == _NAMES[chosen]
    assert (report["setting"], report["why"]) == ("auto", "measured")
    assert report["stats_per_second"] == rates
    assert report["reason"] in line.group(0)
    queues = status_of(mountpoint)["io_uring_queues"]
    assert queues == (len(uring.possible_cpus()) if chosen == "io_uring" else 0)
    table = run_fusestore("status", str(mountpoint), timeout=10).stdout
    assert f"transport auto: {report['reason']}" in table

    (mountpoint / "image").write_bytes(b"served by the chosen transport")
    assert (mountpoint / "image").read_bytes() == b"served by the chosen transport"
    assert mounts_under(private) == []
    assert os.listdir(private) == []  # each probe's directory removed
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert wait_for_exit(pid)


@pytest.mark.parametrize(
    "args",
    [
        ["--transport", "devfuse"],
        ["--no-io-uring"],  # the older spelling
        ["--transport", "io_uring", "--no-io-uring"],  # the last one given wins
    ],
)
def test_transport_devfuse_on_the_command_line_is_dev_fuse_set(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, args: list[str]
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], *args)
    report = status_of(mounted.mountpoint)
    assert report["transport"]["chosen"] == "devfuse"
    assert report["transport"]["why"] == "set"
    assert report["transport"]["stats_per_second"] is None  # nothing measured
    assert report["io_uring_queues"] == 0
    assert "requests through /dev/fuse: transport = devfuse (set)" in mounted.log()


@pytest.mark.parametrize("option", ["transport=devfuse", "no_io_uring"])
def test_transport_devfuse_as_a_mount8_option_is_dev_fuse_set(
    mountpoint: Path, two_datadirs: list[Datadir], option: str
) -> None:
    source = ",".join(d.spec for d in two_datadirs)
    result = run_fusestore(source, str(mountpoint), "-o", option)
    assert result.returncode == 0, result.stderr
    try:
        report = status_of(mountpoint)
        assert (report["transport"]["chosen"], report["transport"]["why"]) == ("devfuse", "set")
        assert report["io_uring_queues"] == 0
        (mountpoint / "x").write_bytes(b"x")
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.skipif(
    not uring.ENABLE_PARAMETER.exists(), reason="this kernel has no FUSE over io_uring"
)
def test_transport_io_uring_in_a_config_file_is_io_uring_set(
    tmp_path: Path, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    config = write_config(tmp_path / "pool.toml", transport="io_uring")
    mounted = mount_pool([Datadir(tmpfs("d", 8), 0)], "--config", str(config))
    report = status_of(mounted.mountpoint)
    assert (report["transport"]["chosen"], report["transport"]["why"]) == ("io_uring", "set")
    assert report["io_uring_queues"] == len(uring.possible_cpus())


@pytest.mark.parametrize(
    "form", [["--transport", "fast"], ["-o", "transport=fast"], ["-o", "transport="]]
)
def test_a_bad_transport_is_refused_naming_it(
    tmpfs: TmpfsFactory, mountpoint: Path, form: list[str]
) -> None:
    result = run_fusestore("mount", "--datadir", str(tmpfs("d", 8)), *form, str(mountpoint))
    assert result.returncode == 2
    assert "'transport'" in result.stderr, result.stderr
    value = form[1].partition("=")[2] if "=" in form[1] else form[1]
    assert (repr(value) in result.stderr) or "needs a value" in result.stderr, result.stderr
    assert not is_mounted(mountpoint)


def test_a_bad_transport_in_a_config_file_names_file_line_and_value(
    tmp_path: Path, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    config = write_config(tmp_path / "pool.toml", datadir=str(tmpfs("d", 8)), transport="uring")
    result = run_fusestore("mount", "--config", str(config), str(mountpoint))
    assert result.returncode == 2
    assert f"{config}:2: setting 'transport' must be auto, io_uring or devfuse, not 'uring'" in (
        result.stderr
    )


def test_no_io_uring_and_transport_io_uring_in_one_source_contradict(
    tmp_path: Path, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    config = write_config(
        tmp_path / "pool.toml", datadir=str(tmpfs("d", 8)), transport="io_uring", no_io_uring=True
    )
    result = run_fusestore("mount", "--config", str(config), str(mountpoint))
    assert result.returncode == 2
    assert "no_io_uring and transport = 'io_uring' contradict" in result.stderr


def test_a_reload_keeps_the_transport_and_says_a_new_one_waits_for_the_next_mount(
    tmp_path: Path, tmpfs: TmpfsFactory, mountpoint: Path
) -> None:
    datadir = str(tmpfs("d", 8))
    config = write_config(tmp_path / "pool.toml", datadir=datadir, transport="devfuse")
    log_file = tmp_path / "daemon.log"
    args = ["mount", "--config", str(config), "--log-file", str(log_file), str(mountpoint)]
    assert run_fusestore(*args).returncode == 0
    try:
        write_config(config, datadir=datadir, transport="io_uring")
        os.kill(daemon_pid(mountpoint), signal.SIGHUP)
        wait_for_log(log_file, "reloaded")
        assert (
            "WARNING transport = io_uring takes effect at the next mount; this one keeps its "
            "transport" in log_file.read_text()
        )
        report = status_of(mountpoint)
        assert (report["transport"]["chosen"], report["io_uring_queues"]) == ("devfuse", 0)
        (mountpoint / "x").write_bytes(b"x")
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
