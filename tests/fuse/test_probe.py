"""The transport probe (``fusestore/fuse/probe.py``) and the choice it feeds
(``transport.py``), run in the test's own process: a probe mount served by
a request loop of ours, timed by another process.

Through a real daemon: ``tests/service/test_transport.py``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from fusestore.fuse import probe, transport, uring


def mounts_under(directory: Path) -> list[str]:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in mounts if line.split()[4].startswith(f"{directory}/")]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the probe makes its mountpoints, for this test alone."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.mark.parametrize(
    "io_uring",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not uring.ENABLE_PARAMETER.exists(), reason="no FUSE over io_uring"
            ),
        ),
        False,
    ],
    ids=["io_uring", "devfuse"],
)
def test_the_probe_times_stats_of_its_mount_and_leaves_nothing_behind(
    private_tmp: Path, io_uring: bool
) -> None:
    if io_uring:
        assert uring.switch_on()
    asked = []

    def root_stat() -> os.stat_result:
        asked.append(1)
        return os.stat(private_tmp)

    rate = probe.stats_per_second(io_uring, 50, root_stat, rounds=2)
    # Every stat reached the daemon (attribute timeout 0): warm-up and rounds.
    assert len(asked) >= probe.STATS * 2
    assert 1000 < rate < 10_000_000
    assert mounts_under(private_tmp) == []
    assert os.listdir(private_tmp) == []


def test_a_failing_probe_unmounts_and_raises(
    private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe, "_CLIENT", "import sys; sys.exit('no stats today')")
    with pytest.raises(probe.ProbeError, match="no stats today"):
        probe.stats_per_second(False, 50, lambda: os.stat(private_tmp))
    assert mounts_under(private_tmp) == []
    assert os.listdir(private_tmp) == []


def test_when_the_probe_fails_auto_falls_back_to_dev_fuse_and_says_why(
    private_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not uring.ENABLE_PARAMETER.exists():
        pytest.skip("this kernel has no FUSE over io_uring: auto probes nothing")
    monkeypatch.setattr(probe, "_CLIENT", "import sys; sys.exit('no stats today')")
    with caplog.at_level(logging.INFO):
        choice = transport.choose("auto", 50, lambda: os.stat(private_tmp))
    assert (choice.name, choice.why, choice.rates) == ("devfuse", "probe failed", None)
    assert "no stats today" in choice.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the transport probe failed" in w for w in warnings), warnings
    assert f"requests through /dev/fuse: {choice.reason}" in caplog.text
    assert mounts_under(private_tmp) == []


@pytest.mark.parametrize(
    ("io_uring", "devfuse", "chosen"),
    [
        (60_000, 20_000, "io_uring"),
        (14_000, 33_000, "devfuse"),  # the filer's machine
        (50_000, 52_000, "io_uring"),  # a near-tie keeps io_uring
        (50_000, 50_000 / (1 - transport.NOISE) + 100, "devfuse"),
    ],
)
def test_auto_takes_io_uring_unless_dev_fuse_is_faster_beyond_the_noise(
    io_uring: float, devfuse: float, chosen: str
) -> None:
    rates = {"io_uring": io_uring, "devfuse": devfuse}
    choice = transport.decide(rates, 0.3)
    assert (choice.name, choice.why, choice.io_uring) == (chosen, "measured", chosen == "io_uring")
    assert choice.reason.startswith(f"measured {round(rates[chosen]):,} stats/s vs ")
