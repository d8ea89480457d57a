"""A failing datadir under a live pool: README "How it behaves", *Failing datadirs*.

Why it exists: a disk that answers, but fails reads and writes with EIO,
must cost the programs using the pool as little as it can: failed requests
get EIO (counted per datadir in ``status``, logged once per file), new files
go elsewhere until the datadir passes a write test, and a new file whose
write failed there moves to another datadir when none of its bytes was lost.
Each test puts a faultyfs datadir (``tests/faulty.py``) at the top of a pool
over a plain tmpfs one, as ``test_failures.py`` does.
"""

from __future__ import annotations

import errno
import os
import re
import time
from typing import Any

import pytest

from fusestore.admin import status
from fusestore.pool import health
from tests.conftest import errno_of, eventually, files_below
from tests.mount.conftest import INCOMING, FaultyPool, closed_on_failure

MiB = 1 << 20

# A failing disk is the pool's business, not the transport's: one run is enough.
pytestmark = pytest.mark.one_transport


def row_of(rig: FaultyPool, which: str = "faulty") -> dict[str, Any]:
    """The datadir's row in ``fusestore status --json``."""
    path = str(rig.faulty.path if which == "faulty" else rig.other.path)
    [row] = [r for r in status.read(str(rig.mounted.mountpoint))["datadirs"] if r["path"] == path]
    return row


def failed_line(rig: FaultyPool, kind: str, name: str) -> str:
    return f"ERROR datadir {rig.faulty.path}: {kind} of {name!r} failed: Input/output error"


def test_a_new_file_whose_write_fails_moves_and_the_datadir_takes_no_new_files(
    rig: FaultyPool,
) -> None:
    data = os.urandom(3 * MiB)
    fd = os.open(rig.mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    with closed_on_failure(fd):
        assert os.write(fd, data[:MiB]) == MiB
        rig.faulty.fail("write", INCOMING, "EIO")
        assert os.write(fd, data[MiB : 2 * MiB]) == MiB  # moved, then written there
        failed_at = time.monotonic()
        assert os.write(fd, data[2 * MiB :]) == MiB
    os.close(fd)  # published, with every byte
    assert "injected EIO into write" in rig.faulty.log()
    assert files_below(rig.other.path) == {"image": data}
    assert rig.on_faulty_disk() == {}
    assert rig.mounted.path("image").read_bytes() == data
    log = rig.mounted.log()
    faulty, other = rig.faulty.path, rig.other.path
    assert f"moved 'image' ({MiB} bytes) from failing datadir {faulty} to {other}" in log
    assert log.count(failed_line(rig, "write", "image")) == 1
    assert log.count(f"ERROR datadir {faulty} is failing: a write of 'image' failed") == 1
    assert "removed incomplete" not in log

    row = row_of(rig)
    assert row["state"] == "failing" and row["write_errors"] >= 1 and row["read_errors"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["failing_since"])
    assert row_of(rig, "other")["write_errors"] == 0
    table = status.render_table(status.read(str(rig.mounted.mountpoint)))
    assert re.search(rf"^{faulty}\s+2\s+failing since \S+\s+0/\d+\s", table, re.MULTILINE)

    rig.mounted.path("second").write_bytes(b"elsewhere")  # no new files while failing
    assert rig.mounted.holders("second") == [other]

    # Healed, it takes new files again once a write test passes, at least
    # WRITE_TEST_QUIET seconds after its last failed write.
    rig.faulty.heal()
    assert row_of(rig)["state"] == "failing"
    assert eventually(lambda: row_of(rig)["state"] == "ok", health.WRITE_TEST_QUIET + 15)
    assert time.monotonic() - failed_at >= health.WRITE_TEST_QUIET - 1
    row = row_of(rig)
    assert row["failing_since"] is None and row["write_errors"] >= 1  # the count stays
    assert f"WARNING datadir {faulty} passes a write test: it takes new files again" in (
        rig.mounted.log()
    )
    rig.mounted.path("third").write_bytes(b"home again")
    assert rig.mounted.holders("third") == [faulty]
    assert files_below(rig.faulty.backing) == {"third": b"home again"}  # no test file left


def test_an_existing_file_whose_write_fails_gets_eio_and_stays(rig: FaultyPool) -> None:
    old = os.urandom(MiB)
    rig.mounted.path("image").write_bytes(old)
    rig.faulty.fail("write", "image", "EIO")
    fd = os.open(rig.mounted.path("image"), os.O_WRONLY)
    with closed_on_failure(fd):
        for offset in (0, 4096, 8192):
            assert errno_of(lambda at=offset: os.pwrite(fd, b"new bytes", at)) == errno.EIO
    os.close(fd)  # nothing to publish: no error
    rig.faulty.heal()
    assert rig.on_faulty_disk() == {"image": old}  # nothing moved: the file lives there
    assert files_below(rig.other.path) == {}
    row = row_of(rig)
    assert (row["state"], row["write_errors"], row["read_errors"]) == ("failing", 3, 0)
    log = rig.mounted.log()
    assert log.count(failed_line(rig, "write", "image")) == 1  # one line per file
    assert "moved" not in log and "removed" not in log
    rig.mounted.path("new").write_bytes(b"elsewhere")
    assert rig.mounted.holders("new") == [rig.other.path]


def test_a_read_that_fails_gets_eio_and_is_counted(rig: FaultyPool) -> None:
    """Read through the daemon: a file open for writing too is not in passthrough
    (``test_failures.py``), where the kernel would read the datadir itself."""
    data = os.urandom(2 * MiB)
    rig.mounted.path("image").write_bytes(data)
    fd = os.open(rig.mounted.path("image"), os.O_RDWR)
    with closed_on_failure(fd):
        rig.faulty.fail("read", "image", "EIO")
        for offset in (0, MiB, MiB + 4096):
            assert errno_of(lambda at=offset: os.pread(fd, 4096, at)) == errno.EIO
        rig.faulty.heal()
        assert os.pread(fd, 4096, MiB) == data[MiB : MiB + 4096]
    os.close(fd)
    row = row_of(rig)
    assert (row["state"], row["read_errors"], row["write_errors"]) == ("ok", 3, 0)
    assert row["failing_since"] is None  # reads alone do not keep new files away
    assert rig.mounted.log().count(failed_line(rig, "read", "image")) == 1
    rig.mounted.path("new").write_bytes(b"placed as usual")
    assert rig.mounted.holders("new") == [rig.faulty.path]


def test_a_new_file_whose_bytes_cannot_be_read_back_is_removed_at_close(
    rig: FaultyPool,
) -> None:
    """README *Failed writes*: the write fails where the file cannot move
    whole, and no datadir keeps any of its bytes."""
    fd = os.open(rig.mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    with closed_on_failure(fd):
        assert os.write(fd, os.urandom(MiB)) == MiB
        rig.faulty.fail("write", INCOMING, "EIO")
        rig.faulty.fail("read", INCOMING, "EIO")
        assert errno_of(lambda: os.write(fd, os.urandom(MiB))) == errno.EIO
        assert errno_of(lambda: os.write(fd, os.urandom(MiB))) == errno.EIO
    assert errno_of(lambda: os.close(fd)) == errno.EIO
    assert "injected EIO into read" in rig.faulty.log()
    rig.faulty.heal()
    assert rig.on_faulty_disk() == {}
    assert files_below(rig.other.path) == {}
    assert errno_of(lambda: os.stat(rig.mounted.path("image"))) == errno.ENOENT
    log = rig.mounted.log()
    assert log.count(failed_line(rig, "write", "image")) == 1
    assert log.count(f"cannot move 'image' off failing datadir {rig.faulty.path}") == 1
    assert "removed incomplete new file 'image'" in log
    row = row_of(rig)
    assert row["state"] == "failing" and row["write_errors"] == 2
