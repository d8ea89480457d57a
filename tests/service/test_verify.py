"""``fusestore verify``: README, *Verifying checksums*; docs/operations.md.

The files are put in the datadirs directly, with records written the way
the daemon writes them (``fusestore/pool/checksums.py``) from digests
computed here with hashlib, so each test knows what verify must find.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fusestore.pool import checksums
from fusestore.pool.checksums import Record, Stamp
from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    eventually,
    fusestore_command,
    remount,
    run_fusestore,
    unmount_datadir,
)
from tests.faulty import FaultyFactory, faulty_datadir  # noqa: F401

ALGORITHMS = ("md5", "sha256")


def digests(path: Path, algorithms: tuple[str, ...] = ALGORITHMS) -> dict[str, str]:
    data = path.read_bytes()
    return {name: hashlib.new(name, data).hexdigest() for name in algorithms}


def put(datadir: Path, name: str, size: int, record: bool = True) -> Path:
    """A file of random bytes written straight into a datadir, with a record
    of its digests unless ``record`` is false."""
    path = datadir / name
    path.write_bytes(os.urandom(size))
    if record:
        checksums.write_record(str(path), Record(Stamp.of(path.stat()), digests(path)))
    return path


def flip_byte(path: Path, offset: int) -> None:
    """Damage one byte as a failing disk would: size and mtime as they were."""
    st = path.stat()
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert Stamp.of(path.stat()) == Stamp.of(st)


def verified(path: Path) -> str | None:
    return checksums.read_verified(str(path), path.stat())


def summary_file(datadir: Path) -> dict[str, object] | None:
    path = datadir / ".fusestore" / "verify.json"
    return json.loads(path.read_text()) if path.exists() else None


def verify_json(*args: str) -> tuple[int, dict]:
    result = run_fusestore("verify", "--json", *args, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def mounted(two_datadirs: list[Datadir], mount_pool: MountFactory) -> MountedPool:
    """A mounted pool of two tmpfs datadirs (fast: 16 MiB, big: 64 MiB)."""
    return mount_pool(two_datadirs)


def test_a_clean_pool_exits_0_and_stamps_every_file_verified(mounted: MountedPool) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    files = [put(fast, "a", 300_000), put(big, "b", 2 * MiB + 17), put(big, "empty", 0)]
    assert [verified(path) for path in files] == [None] * 3
    result = run_fusestore("verify", str(mounted.mountpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # no progress bar off a terminal
    assert result.stdout.splitlines() == [
        f"ok: 3 files in 2 datadir(s): 3 verified, 0 corrupt, 0 changed, "
        f"0 unreadable, 0 unverified, "
        f"0 filled, 0 skipped; {300_000 + 2 * MiB + 17} bytes read"
    ]
    for path in files:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", verified(path) or "")
    assert summary_file(fast)["verified"] == 1  # type: ignore[index]
    big_summary = summary_file(big)
    assert big_summary is not None
    keys = ("files", "verified", "corrupt", "changed", "unreadable")
    assert {k: big_summary[k] for k in keys} == {
        "files": 2,
        "verified": 2,
        "corrupt": 0,
        "changed": 0,
        "unreadable": 0,
    }


def test_a_flipped_byte_is_corrupt_naming_file_datadir_and_digests(mounted: MountedPool) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    good = put(fast, "good", 100_000)
    bad = put(big, "bad", 3 * MiB)
    expected = digests(bad)
    flip_byte(bad, 2 * MiB + 5)
    found = digests(bad)
    result = run_fusestore("verify", str(mounted.mountpoint))
    assert result.returncode == 1
    assert (
        f"corrupt: 'bad' in {big}: md5 expected {expected['md5']}, found {found['md5']}"
        in result.stdout.splitlines()
    )
    assert result.stdout.splitlines()[-1].startswith("FAILED: 2 files in 2 datadir(s): 1 verified")
    assert verified(good) is not None and verified(bad) is None
    assert summary_file(big)["corrupt_names"] == ["bad"]  # type: ignore[index]
    # The record stays: the next verify finds the same damage.
    assert checksums.read_record(str(bad)).digests == expected  # type: ignore[union-attr]
    code, report = verify_json(str(mounted.mountpoint))
    assert code == 1 and report["ok"] is False
    assert report["findings"] == [
        {
            "kind": "corrupt",
            "datadir": str(big),
            "name": "bad",
            "algorithm": "md5",
            "expected": expected["md5"],
            "found": found["md5"],
        }
    ]


def test_a_file_without_checksums_is_unverified_and_not_a_failure(mounted: MountedPool) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    put(fast, "checked", 1000)
    plain = put(big, "plain", 5000, record=False)
    result = run_fusestore("verify", str(mounted.mountpoint))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert f"unverified: 'plain' in {big}: no checksum" in lines
    assert "1 verified" in lines[-1] and "1 unverified" in lines[-1]
    assert lines[-1].endswith("; 1000 bytes read")  # nothing to compare it with: not read
    assert os.listxattr(plain) == []  # untouched
    assert summary_file(big)["unverified"] == 1  # type: ignore[index]


def test_fill_stores_checksums_that_match_the_bytes(mounted: MountedPool) -> None:
    big = mounted.datadirs[1].path
    plain = put(big, "plain", 2 * MiB + 3, record=False)
    result = run_fusestore("verify", "--fill", str(mounted.mountpoint))
    assert result.returncode == 0, result.stdout
    assert f"filled: 'plain' in {big}: md5, sha256" in result.stdout.splitlines()
    record = checksums.read_record(str(plain))
    assert record == Record(Stamp.of(plain.stat()), digests(plain))
    # Now it has checksums: the next run verifies it.
    again = run_fusestore("verify", str(mounted.mountpoint))
    assert again.returncode == 0 and "1 verified" in again.stdout
    assert verified(plain) is not None


def test_fill_computes_the_algorithms_the_pool_is_configured_with(
    two_datadirs: list[Datadir], mount_pool: MountFactory
) -> None:
    mounted = mount_pool(two_datadirs, "--checksums", "sha1,sha512")
    plain = put(mounted.datadirs[0].path, "plain", 4096, record=False)
    assert run_fusestore("verify", "--fill", str(mounted.mountpoint)).returncode == 0
    record = checksums.read_record(str(plain))
    assert record is not None and dict(record.digests) == digests(plain, ("sha1", "sha512"))


def test_a_file_written_outside_the_pool_is_changed_and_fails_not_corrupt(
    mounted: MountedPool,
) -> None:
    """A byte flipped with write(2) moves the mtime: someone wrote the file
    outside the pool. Reported as changed (not rot), and verify fails."""
    fast = mounted.datadirs[0].path
    rewritten = put(fast, "rewritten", 10_000)
    expected = digests(rewritten)
    rewritten.write_bytes(os.urandom(10_000))  # same size, new bytes, new mtime
    code, report = verify_json(str(mounted.mountpoint))
    assert code == 1
    [finding] = report["findings"]
    assert finding["kind"] == "changed" and finding["name"] == "rewritten"
    assert finding["datadir"] == str(fast) and finding["algorithm"] == "md5"
    assert finding["expected"] == expected["md5"] != finding["found"]
    assert finding["found"] == digests(rewritten)["md5"]
    assert report["summary"]["corrupt"] == 0 and report["summary"]["changed"] == 1
    result = run_fusestore("verify", "--fill", str(mounted.mountpoint))
    assert result.returncode == 0, result.stdout
    assert run_fusestore("verify", str(mounted.mountpoint)).returncode == 0


def test_a_file_whose_times_alone_changed_outside_the_pool_is_restamped(
    mounted: MountedPool,
) -> None:
    fast = mounted.datadirs[0].path
    touched = put(fast, "touched", 10_000)
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    code, report = verify_json(str(mounted.mountpoint))
    assert code == 0
    assert [(f["kind"], f["name"]) for f in report["findings"]] == [("restamped", "touched")]
    assert report["summary"]["verified"] == 1
    record = checksums.read_record(str(touched))
    assert record == Record(Stamp.of(touched.stat()), digests(touched))
    assert verified(touched) is not None


def test_datadir_limits_the_pass_to_one_datadir(mounted: MountedPool) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    flip_byte(put(fast, "damaged", 5000), 10)
    fine = put(big, "fine", 5000)
    result = run_fusestore("verify", "--datadir", str(big), str(mounted.mountpoint))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "ok: 1 files in 1 datadir(s): 1 verified, 0 corrupt, 0 changed, "
        "0 unreadable, 0 unverified, "
        "0 filled, 0 skipped; 5000 bytes read"
    ]
    assert verified(fine) is not None
    assert summary_file(fast) is None and summary_file(big) is not None
    # The other datadir alone fails.
    assert run_fusestore("verify", "--datadir", str(fast), str(mounted.mountpoint)).returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--datadir", "/nonexistent"], "is not a datadir of"),
        (["--rate", "0"], "must be a number above 0"),
        (["--rate", "fast"], "must be a number above 0"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    mounted: MountedPool, args: list[str], message: str
) -> None:
    result = run_fusestore("verify", *args, str(mounted.mountpoint))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert result.stdout == ""


def test_a_datadir_list_works_without_a_mount(tmpfs: TmpfsFactory) -> None:
    one, two = tmpfs("one", 16), tmpfs("two", 16)
    put(one, "x", 100)
    flip_byte(put(two, "y", 100), 0)
    result = run_fusestore("verify", f"{one}:1,{two}:2")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"corrupt: 'y' in {two}: md5 expected")


def test_json_is_one_document_of_findings_and_counts(mounted: MountedPool) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    put(fast, "ok", 1000)
    put(big, "plain", 10, record=False)
    code, report = verify_json(str(mounted.mountpoint))
    assert code == 0
    assert report["version"] == 1 and report["ok"] is True
    assert report["datadirs"] == [str(fast), str(big)]
    assert report["findings"] == [
        {"kind": "unverified", "datadir": str(big), "name": "plain", "detail": "no checksum"}
    ]
    summary = dict(report["summary"])
    assert isinstance(summary.pop("seconds"), float)
    assert summary == {
        "files": 2,
        "bytes_read": 1000,
        "verified": 1,
        "unverified": 1,
        "filled": 0,
        "skipped": 0,
        "corrupt": 0,
        "changed": 0,
        "unreadable": 0,
    }


def test_rate_caps_the_read_rate(mounted: MountedPool) -> None:
    put(mounted.datadirs[1].path, "large", 8 * MiB)
    code, report = verify_json("--rate", "16", str(mounted.mountpoint))
    assert code == 0 and report["summary"]["verified"] == 1
    assert report["summary"]["seconds"] >= 0.4  # 8 MiB at 16 MiB/s: 0.5 s


def _start_slow_verify(target: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        fusestore_command("verify", "--json", "--rate", "1", *args, str(target)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reading(process: subprocess.Popen[str], path: Path) -> bool:
    """Whether ``process`` has ``path`` open and sleeps in --rate's pacing,
    i.e. it has read a chunk of it and has more to read."""
    try:
        fds = [os.readlink(fd) for fd in Path(f"/proc/{process.pid}/fd").iterdir()]
        waiting = Path(f"/proc/{process.pid}/wchan").read_text() == "hrtimer_nanosleep"
    except OSError:
        return False
    return str(path) in fds and waiting


def _finish(process: subprocess.Popen[str]) -> tuple[int, dict]:
    out, err = process.communicate(timeout=60)
    assert process.returncode in (0, 1), err
    return process.returncode, json.loads(out)


@pytest.mark.parametrize(
    ("fill", "reason"), [(False, "being written"), (True, "changed while verifying")]
)
def test_a_file_that_changes_while_read_is_skipped(
    mounted: MountedPool, fill: bool, reason: str
) -> None:
    big = mounted.datadirs[1].path
    path = put(big, "live", 4 * MiB, record=not fill)
    record_before = os.getxattr(path, checksums.RECORD) if not fill else None
    process = _start_slow_verify(mounted.mountpoint, *(["--fill"] if fill else []))
    try:
        assert eventually(lambda: _reading(process, path), seconds=20)
        with path.open("r+b") as file:  # a writer, behind the pool
            file.write(b"new bytes")
    finally:
        code, report = _finish(process)
    assert code == 0
    assert report["findings"] == [
        {"kind": "skipped", "datadir": str(big), "name": "live", "detail": reason}
    ]
    assert report["summary"]["bytes_read"] < 4 * MiB  # given up at once
    if fill:
        assert checksums.read_record(str(path)) is None  # nothing stored for changed bytes
    else:
        assert os.getxattr(path, checksums.RECORD) == record_before
        assert verified(path) is None


def test_a_file_removed_during_the_run_is_no_error(mounted: MountedPool) -> None:
    big = mounted.datadirs[1].path
    first = put(big, "a-first", 3 * MiB)
    later = put(big, "b-later", 1000)
    process = _start_slow_verify(mounted.mountpoint)
    try:
        assert eventually(lambda: _reading(process, first), seconds=20)
        later.unlink()
    finally:
        code, report = _finish(process)
    assert code == 0
    assert report["findings"] == []
    assert report["summary"]["files"] == 1 and report["summary"]["verified"] == 1


def test_killed_halfway_it_changes_nothing_but_stamps_and_new_records(
    mounted: MountedPool,
) -> None:
    fast, big = (d.path for d in mounted.datadirs)
    checked = put(big, "a-checked", 1000)
    filled = put(big, "b-filled", 1000, record=False)
    stale = put(big, "c-stale", 1000)
    flip_byte(stale, 1)
    os.utime(stale, ns=(0, 10**18))  # changed since checksummed
    large = put(big, "d-large", 4 * MiB, record=False)
    untouched = put(big, "e-untouched", 1000, record=False)
    before = {p: (p.read_bytes(), os.listxattr(p)) for p in (checked, stale, large, untouched)}
    stale_record = os.getxattr(stale, checksums.RECORD)
    process = _start_slow_verify(mounted.mountpoint, "--fill", "--datadir", str(big))
    try:
        assert eventually(lambda: _reading(process, large), seconds=20)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=20)
    assert verified(checked) is not None  # done before the kill
    assert checksums.read_record(str(filled)) == Record(Stamp.of(filled.stat()), digests(filled))
    refilled = checksums.read_record(str(stale))
    assert refilled == Record(Stamp.of(stale.stat()), digests(stale))
    assert os.getxattr(stale, checksums.RECORD) != stale_record
    for path in (large, untouched):  # not reached, or not finished
        assert (path.read_bytes(), os.listxattr(path)) == before[path]
    assert checked.read_bytes() == before[checked][0]
    assert summary_file(big) is None  # a summary only for a whole pass
    assert [p.name for p in (big / ".fusestore").iterdir() if "verify" in p.name] == []
    assert summary_file(fast) is None


def test_a_datadir_without_user_xattrs_is_one_finding(
    ramfs: Callable[[str], Path], tmpfs: TmpfsFactory
) -> None:
    bare, other = ramfs("bare"), tmpfs("other", 16)
    put(other, "checked", 100)
    for name in ("x", "y", "z"):
        (bare / name).write_bytes(b"data")
    result = run_fusestore("verify", f"{other}:1,{bare}:0")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        f"no-user-xattrs: {bare}: its filesystem keeps no user extended attributes: "
        "3 file(s) without checksums",
        "ok: 4 files in 2 datadir(s): 1 verified, 0 corrupt, 0 changed, "
        "0 unreadable, 3 unverified, "
        "0 filled, 0 skipped; 100 bytes read",
    ]


def test_a_read_only_datadir_is_verified_without_stamps(tmpfs: TmpfsFactory) -> None:
    datadir = tmpfs("ro", 16)
    (datadir / ".fusestore").mkdir()
    checked = put(datadir, "checked", 1000)
    put(datadir, "plain", 1000, record=False)
    remount(datadir, "ro")
    result = run_fusestore("verify", "--fill", f"{datadir}:0")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        f"unverified: 'plain' in {datadir}: not stored: Read-only file system",
        f"not-stored: {datadir}: verified stamps: checked: Read-only file system",
        f"not-stored: {datadir}: verify.json: Read-only file system",
        "ok: 2 files in 1 datadir(s): 1 verified, 0 corrupt, 0 changed, "
        "0 unreadable, 1 unverified, "
        "0 filled, 0 skipped; 2000 bytes read",
    ]
    assert verified(checked) is None


def test_a_read_error_is_unreadable_and_fails(
    faulty_datadir: FaultyFactory,  # noqa: F811
    tmpfs: TmpfsFactory,
    tmp_path: Path,
) -> None:
    """A real EIO: an ext4 disk whose image lies on a datadir that fails reads
    on demand (tests/faulty.py), so the read reaches a failing device."""
    good = tmpfs("good", 16)
    put(good, "fine", 1000)
    faulty = faulty_datadir("faulty", 64)
    image, disk = faulty.path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    with image.open("wb") as file:
        file.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    try:
        subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)
        (disk / "lost+found").rmdir()
        put(disk, "damaged", 3 * MiB)
        # Remounted so that none of its bytes are cached, then its name and
        # attributes read once (they stay cached): only its data read fails.
        unmount_datadir(disk)
        subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)
        assert checksums.read_record(str(disk / "damaged")) is not None
        faulty.fail("read", "disk.img", "EIO")
        result = run_fusestore("verify", f"{good}:1,{disk}:0")
    finally:
        faulty.heal()
        unmount_datadir(disk)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"unreadable: 'damaged' in {disk}: Input/output error" in lines
    assert lines[-1].startswith(
        "FAILED: 2 files in 2 datadir(s): 1 verified, 0 corrupt, 0 changed, 1 unread"
    )


def test_on_a_terminal_it_shows_a_progress_bar(mounted: MountedPool) -> None:
    put(mounted.datadirs[1].path, "large", 3 * MiB)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        fusestore_command("verify", str(mounted.mountpoint)),
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    text = shown.decode(errors="replace")
    assert "verify: 100%" in text and "1/1 files" in text and "B/s" in text
    assert out.startswith("ok: 1 files")


def test_help_explains_the_command() -> None:
    result = run_fusestore("verify", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: fusestore verify")
    text = re.sub(r"\s+", " ", result.stdout)
    for fragment in ("--rate MIB/S", "--fill", "--datadir PATH", "--json", "corrupt"):
        assert fragment in text


def test_verify_is_listed_as_a_command() -> None:
    assert "verify" in run_fusestore("--help").stdout
    assert run_fusestore("verify").returncode == 2  # no target: bad usage


@pytest.mark.parametrize("keep_mtime", [True, False], ids=["rot", "written-outside"])
def test_a_byte_flipped_under_a_file_written_through_the_mount_fails_verify(
    mounted: MountedPool, tmp_path: Path, keep_mtime: bool
) -> None:
    """The issue's check, end to end: the daemon's own checksums, a byte
    flipped in the backing file by dd (rot keeps the mtime; a write outside
    the pool does not), and verify naming the file and its datadir."""
    source = tmp_path / "image"
    source.write_bytes(os.urandom(4 * MiB))
    subprocess.run(["cp", str(source), str(mounted.path("image"))], check=True, timeout=60)
    assert os.getxattr(mounted.path("image"), "user.fusestore.md5")  # computed (waited for)
    assert run_fusestore("verify", str(mounted.mountpoint)).returncode == 0
    [holder] = mounted.holders("image")
    backing = holder / "image"
    st = backing.stat()
    subprocess.run(
        ["dd", f"of={backing}", "bs=1", "seek=1000", "count=1", "conv=notrunc", "status=none"],
        input=bytes([source.read_bytes()[1000] ^ 0xFF]),
        check=True,
    )
    if keep_mtime:
        os.utime(backing, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = run_fusestore("verify", str(mounted.mountpoint))
    assert result.returncode == 1, result.stdout
    kind = "corrupt" if keep_mtime else "changed"
    expected_md5 = hashlib.md5(source.read_bytes()).hexdigest()
    found_md5 = hashlib.md5(backing.read_bytes()).hexdigest()
    assert f"{kind}: 'image' in {holder}: md5 expected {expected_md5}, found {found_md5}" in (
        result.stdout
    )
    assert result.stdout.splitlines()[-1].startswith("FAILED: ")
