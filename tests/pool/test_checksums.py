"""The checksum record and the background checksummer, without a mount.

What the mount tests cannot time: a job whose file is renamed, removed or
written before the worker gets to it (the worker is started only after).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fusestore.pool import checksums
from fusestore.pool.checksummer import Checksummer
from fusestore.pool.checksums import Record, Stamp
from fusestore.pool.config import ConfigError, parse_checksums


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """tmp_path on the test machine is a filesystem with user xattrs."""
    assert checksums.supports_xattrs(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("md5:sha256", ("md5", "sha256")),
        ("SHA512, md5", ("sha512", "md5")),
        ("md5+md5", ("md5",)),
        ("none", ()),
        ([], ()),
        (["blake2b"], ("blake2b",)),
    ],
)
def test_checksum_settings_parse(value: str | list[str], expected: tuple[str, ...]) -> None:
    assert parse_checksums(value) == expected


@pytest.mark.parametrize("bad", ["crc32", "shake_256", "md5:nope"])
def test_unknown_and_variable_length_algorithms_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ConfigError, match=repr(bad.split(":")[-1])):
        parse_checksums(bad)


def test_a_record_round_trips_and_garbage_is_no_record(disk: Path) -> None:
    record = Record(Stamp(12, 34), {"md5": "ab", "sha256": "cd"})
    assert Record.decode(record.encode()) == record
    for garbage in (b"", b"size=1", b"size=x mtime_ns=1 md5=ab", b"\xff\xfe"):
        assert Record.decode(garbage) is None
    path = disk / "file"
    path.write_bytes(b"data")
    os.setxattr(path, checksums.RECORD, b"size=4 nonsense")
    assert checksums.read_record(str(path)) is None


def test_a_record_is_current_only_for_the_bytes_of_its_stamp(disk: Path) -> None:
    path = disk / "file"
    path.write_bytes(b"data")
    st = os.stat(path)
    checksums.write_record(str(path), Record(Stamp.of(st), {"md5": "x"}))
    assert checksums.current_record(str(path), st) is not None
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert checksums.current_record(str(path), os.stat(path)) is None


def test_restamp_keeps_a_current_record_and_its_verify_stamp(disk: Path) -> None:
    path = str(disk / "file")
    Path(path).write_bytes(b"data")
    before = os.stat(path)
    checksums.write_record(path, Record(Stamp.of(before), {"md5": "x"}))
    checksums.write_verified(path, Stamp.of(before), "2026-01-01T00:00:00Z")
    os.utime(path, ns=(1, 2))
    after = os.stat(path)
    checksums.restamp(path, before, after)
    assert checksums.current_record(path, after) == Record(Stamp.of(after), {"md5": "x"})
    assert checksums.read_verified(path, after) == "2026-01-01T00:00:00Z"


def test_compute_matches_hashlib_and_notices_a_file_that_shrank(disk: Path) -> None:
    path = disk / "file"
    data = os.urandom(3 * checksums.CHUNK + 5)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert checksums.compute(fd, ["md5", "sha256"], len(data)) == {
            "md5": hashlib.md5(data).hexdigest(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert checksums.compute(fd, ["md5"], len(data) + 1) is None
        assert checksums.compute(fd, ["md5"], len(data), lambda _: True) is None
    finally:
        os.close(fd)


def run_jobs(checksummer: Checksummer, *paths: str) -> None:
    """Start the worker and wait until every job for ``paths`` is done."""
    checksummer.start()
    for path in paths:
        done = checksummer.pending(path)
        if done is not None:
            assert done.wait(10)
    checksummer.stop()


def test_a_job_follows_its_file_through_a_rename(disk: Path) -> None:
    old, new = str(disk / "tmp"), str(disk / "final")
    Path(old).write_bytes(b"data")
    checksummer = Checksummer()
    checksummer.add(old, ("md5",))
    os.rename(old, new)
    checksummer.renamed(old, new)
    assert checksummer.pending(old) is None and checksummer.pending(new) is not None
    run_jobs(checksummer, new)
    record = checksums.current_record(new, os.stat(new))
    assert record is not None and record.digests == {"md5": hashlib.md5(b"data").hexdigest()}


def test_a_cancelled_job_stores_nothing_and_wakes_its_waiters(disk: Path) -> None:
    path = str(disk / "file")
    Path(path).write_bytes(b"data")
    checksummer = Checksummer()
    checksummer.add(path, ("md5",))
    done = checksummer.pending(path)
    checksummer.cancel(path)
    assert done is not None and done.is_set()
    run_jobs(checksummer)
    assert checksums.read_record(path) is None
    assert checksummer.backlog() == 0


def test_a_file_removed_before_its_job_runs_is_no_error(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(disk / "file")
    Path(path).write_bytes(b"data")
    checksummer = Checksummer()
    checksummer.add(path, ("md5",))
    os.unlink(path)
    run_jobs(checksummer, path)
    assert checksummer.backlog() == 0
    assert "cannot read" not in caplog.text


def test_no_algorithms_means_no_job(disk: Path) -> None:
    path = str(disk / "file")
    Path(path).write_bytes(b"data")
    checksummer = Checksummer()
    checksummer.add(path, ())
    assert checksummer.pending(path) is None and checksummer.backlog() == 0
