"""A failing datadir and its way back (fusestore/pool/datadirs.py, health.py),
on a plain directory, with the prober's clock in the test's hands.

The live pool is tested in ``tests/mount/test_failing.py``; this checks the
timing rule that a test there can only wait for: a failing datadir takes new
files again at the first passed write test at least ``WRITE_TEST_QUIET``
seconds after its last failed write, tests come every
``WRITE_TEST_INTERVAL`` seconds and one right when the quiet time is up.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest

from fusestore.pool import health
from fusestore.pool.config import DatadirSpec
from fusestore.pool.datadirs import Datadir, State, is_disk_error, mark_and_sweep, open_datadirs
from fusestore.pool.health import WRITE_TEST_INTERVAL, WRITE_TEST_QUIET, Prober


@pytest.fixture
def datadir(tmp_path: Path) -> Datadir:
    [made] = open_datadirs([DatadirSpec(str(tmp_path / "d"))], "instance")
    mark_and_sweep([made])
    return made


@pytest.fixture
def tests_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The write tests the prober makes (each still done for real)."""
    made: list[str] = []

    def recorded(datadir: Datadir) -> None:
        made.append(datadir.path)
        real_write_test(datadir)

    monkeypatch.setattr(health, "write_test", recorded)
    return made


real_write_test = health.write_test


def test_disk_errors_are_those_that_blame_the_disk() -> None:
    for code in (errno.EIO, errno.ENXIO, errno.EBADMSG, errno.ESTALE):
        assert is_disk_error(OSError(code, "x"))
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM):
        assert not is_disk_error(OSError(code, "x"))
    assert not is_disk_error(OSError(errno.EINTR, "x"))


def test_a_failed_write_keeps_new_files_away_until_a_late_write_test_passes(
    datadir: Datadir, tests_run: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert datadir.takes_new_files()
    datadir.count_write_error("'image'")
    datadir.count_write_error("'image'")
    assert (datadir.write_errors, datadir.read_errors) == (2, 0)
    assert datadir.failing_since is not None
    assert datadir.assess() is State.FAILING and not datadir.takes_new_files()
    assert caplog.text.count(f"datadir {datadir.path} is failing") == 1  # once, not per error

    prober = Prober(datadir, threading.Event())
    failed_at = datadir.last_write_error
    prober._test_if_failing(failed_at + 1)  # passes, but too soon after the failed write
    prober._test_if_failing(failed_at + 2)  # not due
    prober._test_if_failing(failed_at + 1 + WRITE_TEST_INTERVAL)  # passes, still too soon
    assert len(tests_run) == 2
    assert datadir.assess() is State.FAILING
    prober._test_if_failing(failed_at + WRITE_TEST_QUIET)  # the quiet time is up: tested at once
    assert len(tests_run) == 3
    assert datadir.failing_since is None
    assert datadir.assess() is State.OK and datadir.takes_new_files()
    assert f"datadir {datadir.path} passes a write test: it takes new files again" in caplog.text
    assert f"datadir {datadir.path} is back" not in caplog.text  # said once, by the prober
    assert os.listdir(datadir.private.incoming) == []  # no test file left
    assert datadir.write_errors == 2  # the count stays


def test_a_failed_write_test_starts_the_quiet_time_again(
    datadir: Datadir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    datadir.count_write_error("'image'")
    failed_at = datadir.last_write_error
    prober = Prober(datadir, threading.Event())

    def failing(datadir: Datadir) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(health, "write_test", failing)
    prober._test_if_failing(failed_at + 1)
    prober._test_if_failing(failed_at + 1 + WRITE_TEST_INTERVAL)
    failures = [r for r in caplog.records if "fails its write test" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG]  # loud once
    test_failed_at = datadir.last_write_error
    assert test_failed_at > failed_at
    monkeypatch.setattr(health, "write_test", real_write_test)
    prober._test_if_failing(failed_at + WRITE_TEST_QUIET)
    assert datadir.assess() is State.FAILING  # passed, but too soon after the failed test
    prober._test_if_failing(test_failed_at + WRITE_TEST_QUIET)
    assert datadir.assess() is State.OK


def test_a_write_error_during_a_write_test_is_not_forgotten(datadir: Datadir) -> None:
    """A test that began before a write failed cannot end the failing."""
    datadir.count_write_error("'image'")
    started = datadir.last_write_error + WRITE_TEST_QUIET
    datadir.count_write_error("'other'")
    datadir.last_write_error = started + 1  # that write failed while the test ran
    assert not datadir.passed_write_test(started, WRITE_TEST_QUIET)
    assert datadir.assess() is State.FAILING


def test_the_write_test_writes_reads_back_and_removes_its_file(datadir: Datadir) -> None:
    real_write_test(datadir)
    assert os.listdir(datadir.private.incoming) == []
