"""Drain and balance while the pool serves: README "Replacing and adding disks".

Files move between datadirs under a live mount, read and written meanwhile by
ordinary programs; nothing is lost, doubled or shown with other bytes, and
checksums and user attributes go with the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fusestore.admin import status
from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    eventually,
    fusestore_command,
    incoming_files,
    open_path_to,
    run_as_nobody,
    run_fusestore,
    wait_for_exit,
)


def pool_files(mounted: MountedPool) -> dict[str, list[Path]]:
    """Every regular file at the top of each datadir, by name."""
    found: dict[str, list[Path]] = {}
    for datadir in mounted.datadirs:
        for name in sorted(datadir.names()):
            found.setdefault(name, []).append(datadir.path)
    return found


def fill(mounted: MountedPool, count: int, size: int) -> dict[str, bytes]:
    """``count`` files of random bytes written through the mount, checksummed."""
    contents = {f"image{i:02d}": os.urandom(size) for i in range(count)}
    for name, data in contents.items():
        mounted.path(name).write_bytes(data)
        os.getxattr(mounted.path(name), "user.fusestore.sha256")  # waits for it
    return contents


def assert_intact(mounted: MountedPool, contents: dict[str, bytes]) -> None:
    """Each file once in the pool, with its bytes and a checksum that agrees."""
    copies = {n: len(p) for n, p in pool_files(mounted).items() if n in contents}
    assert copies == dict.fromkeys(contents, 1)
    for name, data in contents.items():
        assert mounted.path(name).read_bytes() == data, name
        checksum = os.getxattr(mounted.path(name), "user.fusestore.sha256").decode()
        assert checksum == hashlib.sha256(data).hexdigest(), name


@pytest.fixture
def three(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> MountedPool:
    """64 MiB at priority 3, two of 64 MiB at priority 2."""
    datadirs = [
        Datadir(tmpfs("a", 64), 3),
        Datadir(tmpfs("b", 64), 2),
        Datadir(tmpfs("c", 64), 2),
    ]
    return mount_pool(datadirs)


def drain(mounted: MountedPool, datadir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_fusestore("drain", str(mounted.mountpoint), str(datadir), *args, timeout=90)


def test_drain_under_a_reader_and_a_writer_empties_the_datadir_and_loses_nothing(
    three: MountedPool,
) -> None:
    a = three.datadirs[0].path
    contents = fill(three, 6, 6 * MiB)
    assert set(pool_files(three)) == set(contents) and a in pool_files(three)["image00"]
    big = three.path("image00")
    problems: list[str] = []
    written: list[str] = []
    stop = threading.Event()

    def read_in_a_loop() -> None:
        while not stop.is_set():
            try:
                if big.read_bytes() != contents["image00"]:
                    problems.append("wrong bytes")
            except OSError as exc:
                problems.append(str(exc))

    def write_new_files() -> None:
        while not stop.is_set() and len(written) < 50:
            name = f"new{len(written):02d}"
            three.path(name).write_bytes(name.encode() * 1000)
            written.append(name)

    reader, writer = (
        threading.Thread(target=read_in_a_loop),
        threading.Thread(target=write_new_files),
    )
    reader.start()
    command = fusestore_command("drain", str(three.mountpoint), str(a), "--json", "--rate", "20")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # New files are written once the datadir is draining: they must land elsewhere.
        assert eventually(lambda: status.read(str(three.mountpoint)).get("job") is not None)
        writer.start()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        stop.set()
        reader.join(timeout=30)
        if writer.ident is not None:
            writer.join(timeout=30)
        if process.poll() is None:
            process.kill()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert sorted(m["name"] for m in report["moved"]) == sorted(contents)
    assert problems == [] and written
    assert a not in {p for paths in pool_files(three).values() for p in paths}
    assert_intact(three, contents)
    for name in written:  # landed elsewhere, whole
        assert three.holders(name) != [a] and three.path(name).read_bytes() == name.encode() * 1000
    assert [incoming_files(d) for d in three.datadirs] == [[], [], []]
    check = run_fusestore("check", str(three.mountpoint))
    assert check.returncode == 0, check.stdout


def test_the_drained_datadir_takes_no_new_files_until_a_reload(three: MountedPool) -> None:
    a = three.datadirs[0].path
    fill(three, 1, MiB)
    assert drain(three, a).returncode == 0
    three.path("after").write_bytes(b"x")
    assert three.holders("after") != [a]
    report = status.read(str(three.mountpoint))
    assert {row["path"]: row["state"] for row in report["datadirs"]}[str(a)] == "draining"


def test_a_drain_that_cannot_fit_is_refused_up_front_naming_the_shortfall(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    big, small = Datadir(tmpfs("big", 64), 2), Datadir(tmpfs("small", 8), 1)
    mounted = mount_pool([big, small])
    contents = fill(mounted, 3, 6 * MiB)
    result = drain(mounted, big.path)
    assert result.returncode == 2
    assert "short" in result.stderr and "MiB" in result.stderr, result.stderr
    assert pool_files(mounted) == {name: [big.path] for name in contents}
    mounted.path("next").write_bytes(b"x")  # not left draining
    assert mounted.holders("next") == [big.path]


def test_dry_run_prints_the_plan_and_changes_nothing(three: MountedPool) -> None:
    a = three.datadirs[0].path
    contents = fill(three, 3, 2 * MiB)
    before = pool_files(three)
    result = drain(three, a, "--dry-run")
    assert result.returncode == 0, result.stderr
    for name in contents:
        assert name in result.stdout
    assert pool_files(three) == before
    three.path("next").write_bytes(b"x")
    assert three.holders("next") == [a]  # a dry run does not stop new files


def test_checksums_and_user_attributes_move_with_the_file(three: MountedPool) -> None:
    a = three.datadirs[0].path
    fill(three, 1, 3 * MiB)
    os.setxattr(three.path("image00"), "user.note", b"kept")
    record = os.getxattr(a / "image00", "user.fusestore.checksums")
    mtime = os.stat(a / "image00").st_mtime_ns
    assert drain(three, a).returncode == 0
    [holder] = three.holders("image00")
    assert holder != a
    assert os.getxattr(holder / "image00", "user.fusestore.checksums") == record
    assert os.stat(holder / "image00").st_mtime_ns == mtime
    assert os.getxattr(three.path("image00"), "user.note") == b"kept"
    assert os.getxattr(three.path("image00"), "user.fusestore.datadir").decode() == str(holder)
    assert run_fusestore("verify", str(three.mountpoint)).returncode == 0


def test_a_file_open_for_writing_is_skipped_and_moved_by_the_next_run(three: MountedPool) -> None:
    a = three.datadirs[0].path
    contents = fill(three, 2, MiB)
    with open(three.path("image01"), "r+b") as writer:
        result = drain(three, a)
        assert result.returncode == 1
        assert "skipped: 'image01'" in result.stdout and "open for writing" in result.stdout
        assert three.holders("image01") == [a]
        writer.write(b"changed")
    contents["image01"] = b"changed" + contents["image01"][7:]
    assert drain(three, a).returncode == 0
    assert_intact(three, contents)


def test_a_killed_drain_leaves_nothing_lost_or_doubled_and_a_rerun_completes(
    three: MountedPool,
) -> None:
    a = three.datadirs[0].path
    contents = fill(three, 5, 8 * MiB)
    command = fusestore_command("drain", str(three.mountpoint), str(a), "--rate", "8")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert eventually(lambda: any(incoming_files(d) for d in three.datadirs[1:]), seconds=20)
        time.sleep(0.3)  # mid-copy, at 8 MiB/s
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=20)
    # The daemon notices the command is gone and stops after the file it copies.
    assert eventually(lambda: "drain stopped" in three.log(), seconds=20)
    assert {n: len(p) for n, p in pool_files(three).items()} == dict.fromkeys(contents, 1)
    result = drain(three, a)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_intact(three, contents)
    assert all(a not in paths for paths in pool_files(three).values())
    assert run_fusestore("check", str(three.mountpoint)).returncode == 0


def test_a_daemon_killed_mid_drain_loses_nothing_and_the_drain_completes_after_a_remount(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadirs = [Datadir(tmpfs("a", 64), 3), Datadir(tmpfs("b", 64), 2)]
    first = mount_pool(datadirs)
    contents = fill(first, 4, 8 * MiB)
    command = fusestore_command("drain", str(first.mountpoint), str(datadirs[0].path))
    process = subprocess.Popen([*command, "--rate", "8"], stdout=subprocess.PIPE, text=True)
    try:
        assert eventually(lambda: "moved 'image" in first.log(), seconds=30)
    finally:
        first.process.send_signal(signal.SIGKILL)
        wait_for_exit(first.process.pid)
        process.communicate(timeout=20)
    assert process.returncode == 1  # the daemon went away
    first.stop()
    second = mount_pool(datadirs)
    assert {n: len(p) for n, p in pool_files(second).items()} == dict.fromkeys(contents, 1)
    result = drain(second, datadirs[0].path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_intact(second, contents)
    assert run_fusestore("check", str(second.mountpoint)).returncode == 0


def test_balance_moves_files_up_into_a_new_higher_priority_datadir_until_its_reserve(
    tmp_path: Path, tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    low = Datadir(tmpfs("low", 64), 1)
    mounted = mount_pool([low], "--min-free-space", "4M")
    contents = fill(mounted, 6, 4 * MiB)
    for age, name in enumerate(sorted(contents)):  # distinct: tmpfs times are coarse
        os.utime(mounted.path(name), ns=(10**18, (age + 1) * 10**18))
    mounted.stop()
    fast = Datadir(tmpfs("fast", 16), 5)
    remounted = mount_pool([fast, low], "--min-free-space", "4M")
    planned = run_fusestore("balance", str(remounted.mountpoint), "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    assert pool_files(remounted) == {name: [low.path] for name in contents}
    result = run_fusestore("balance", str(remounted.mountpoint), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    up = fast.names()
    assert len(up) == 2  # 16 MiB less the 4 MiB reserve holds two 4 MiB files, not three
    assert os.statvfs(fast.path).f_bavail * os.statvfs(fast.path).f_frsize > 4 * MiB
    assert up == {"image04", "image05"}  # the newest
    assert_intact(remounted, contents)


def test_balance_evens_out_free_space_within_one_priority(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    first = Datadir(tmpfs("first", 64), 1)
    mounted = mount_pool([first])
    contents = fill(mounted, 8, 4 * MiB)
    mounted.stop()
    second = Datadir(tmpfs("second", 64), 1)
    remounted = mount_pool([first, second])
    result = run_fusestore("balance", str(remounted.mountpoint), "--tolerance", "5M")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(first.names()) == len(second.names()) == 4
    assert_intact(remounted, contents)


def test_fill_limit_moves_the_oldest_files_down_a_tier(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    fast, slow = Datadir(tmpfs("fast", 32), 5), Datadir(tmpfs("slow", 64), 1)
    mounted = mount_pool([fast, slow])
    contents = fill(mounted, 6, 4 * MiB)  # 24 of 32 MiB: 75 %
    for age, name in enumerate(sorted(contents)):
        os.utime(mounted.path(name), ns=(10**18, (age + 1) * 10**18))
    result = run_fusestore("balance", str(mounted.mountpoint), "--fill-limit", "40")
    assert result.returncode == 0, result.stdout + result.stderr
    assert fast.names() == {"image03", "image04", "image05"}  # the newest stay
    assert slow.names() == {"image00", "image01", "image02"}
    assert_intact(mounted, contents)


def test_only_root_or_the_daemons_user_may_move_files_but_anyone_sees_status(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    mounted = mount_pool(
        [Datadir(tmpfs("a", 16), 2), Datadir(tmpfs("b", 16), 1)], "-o", "allow_other"
    )
    open_path_to(mounted.mountpoint)
    source = mounted.datadirs[0].path
    denied = run_as_nobody(*fusestore_command("drain", str(mounted.mountpoint), str(source)))
    assert denied.returncode == 2
    assert "permission denied" in denied.stderr and "uid 65534" in denied.stderr
    assert "refused a request from uid 65534" in mounted.log()
    seen = run_as_nobody(*fusestore_command("status", str(mounted.mountpoint), "--json"))
    assert seen.returncode == 0, seen.stderr
    mounted.path("next").write_bytes(b"x")
    assert mounted.holders("next") == [source]  # not draining


def test_sockets_of_dead_daemons_are_removed_when_a_daemon_starts(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    directory = Path(status.socket_paths(str(tmp_path / "gone"))[0]).parent
    directory.mkdir(parents=True, exist_ok=True)
    dead = directory / "0123456789abcdef0123456789abcdef.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()  # as a daemon killed with -9 leaves it
    assert dead.exists()
    mounted = mount_pool([Datadir(tmpfs("a", 16))])
    assert not dead.exists()
    assert Path(status.socket_paths(str(mounted.mountpoint))[0]).exists()  # its own stays


def test_status_shows_a_running_drain(three: MountedPool) -> None:
    a = three.datadirs[0].path
    fill(three, 4, 8 * MiB)
    command = fusestore_command("drain", str(three.mountpoint), str(a), "--rate", "8")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert eventually(lambda: status.read(str(three.mountpoint)).get("job") is not None)
        job = status.read(str(three.mountpoint))["job"]
        assert job["command"] == "drain" and job["datadir"] == str(a)
        assert job["files"] == 4 and job["bytes"] == 32 * MiB
        table = run_fusestore("status", str(three.mountpoint)).stdout
        assert f"draining {a}" in table
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert eventually(lambda: status.read(str(three.mountpoint)).get("job") is None)


@pytest.mark.parametrize("change", ["append", "remove", "setfattr"])
def test_a_file_changed_or_removed_during_its_copy_is_not_moved(
    three: MountedPool, change: str
) -> None:
    """Nothing is resurrected and no old bytes replace new ones."""
    a = three.datadirs[0].path
    fill(three, 1, 8 * MiB)
    command = fusestore_command("drain", str(three.mountpoint), str(a), "--rate", "4")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert eventually(lambda: any(incoming_files(d) for d in three.datadirs[1:]), seconds=20)
        target = three.path("image00")
        if change == "append":
            with open(target, "ab") as f:
                f.write(b"more")
        elif change == "remove":
            target.unlink()
        else:
            os.setxattr(target, "user.note", b"late")
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stdout
    assert "skipped: 'image00'" in stdout
    assert [incoming_files(d) for d in three.datadirs] == [[], [], []]
    if change == "remove":
        assert pool_files(three) == {}
        return
    assert pool_files(three) == {"image00": [a]}  # still where it was, as changed
    if change == "append":
        assert three.path("image00").read_bytes().endswith(b"more")
    else:
        assert os.getxattr(three.path("image00"), "user.note") == b"late"


def test_a_file_that_rotted_before_its_move_is_still_reported_by_verify(
    three: MountedPool,
) -> None:
    """A move checks its copy against the source; the checksum record moves
    with the file unchanged, so rot from before the move is not hidden."""
    a = three.datadirs[0].path
    contents = fill(three, 1, 2 * MiB)
    st = os.stat(a / "image00")
    with open(a / "image00", "r+b") as f:
        f.seek(MiB)
        f.write(bytes([contents["image00"][MiB] ^ 1]))
    os.utime(a / "image00", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert drain(three, a).returncode == 0
    [holder] = three.holders("image00")
    result = run_fusestore("verify", str(three.mountpoint))
    assert result.returncode == 1
    assert f"corrupt: 'image00' in {holder}: md5 expected " in result.stdout
