"""Crash-safe publication: README "How it behaves", *Crash-safe publication*,
*Durability*, *Never replaces*.

A new file is hidden until its last close, then linked under its name
(never replacing one), fsync'ed unless ``--no-sync``; a crash leaves no
half-written file under any name.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    Datadir,
    MiB,
    MountedPool,
    MountFactory,
    TmpfsFactory,
    eventually,
    incoming_files,
)


def test_new_file_is_hidden_until_closed_but_usable_through_the_mount(
    solo: tuple[Datadir, MountedPool],
) -> None:
    datadir, mounted = solo
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"half of it")
        assert not (datadir.path / "image").exists()
        (hidden,) = incoming_files(datadir)
        assert hidden.read_bytes() == b"half of it"
        assert os.stat(mounted.path("image")).st_size == 10
        assert mounted.path("image").read_bytes() == b"half of it"
        assert "image" in os.listdir(mounted.mountpoint)
        os.write(fd, b", and the rest")
    finally:
        os.close(fd)
    assert (datadir.path / "image").read_bytes() == b"half of it, and the rest"
    assert incoming_files(datadir) == []
    assert datadir.names() == {"image"}


def test_empty_new_file_is_in_its_datadir_when_close_returns(
    solo: tuple[Datadir, MountedPool],
) -> None:
    """README *Crash-safe publication*: published at the close() that leaves no
    other handle, so it is in its datadir when close() returns: no wait."""
    datadir, mounted = solo
    fd = os.open(mounted.path("empty"), os.O_CREAT | os.O_WRONLY, 0o644)
    assert datadir.names() == set()
    os.close(fd)
    assert datadir.names() == {"empty"}
    assert (datadir.path / "empty").read_bytes() == b""
    assert incoming_files(datadir) == []
    subprocess.run(["touch", str(mounted.path("touched"))], check=True)  # close(), then exit
    assert datadir.names() == {"empty", "touched"}
    assert incoming_files(datadir) == []


def test_shell_redirection_publishes_only_the_finished_file(
    solo: tuple[Datadir, MountedPool],
) -> None:
    """The shell dup2()s the new file onto stdout and closes it before writing."""
    datadir, mounted = solo
    script = f"exec > {mounted.path('redirected')}; echo first; ls {datadir.path}; echo last"
    result = subprocess.run(["sh", "-c", script], check=True)
    assert result.returncode == 0
    listing_while_open = mounted.path("redirected").read_text().splitlines()
    assert listing_while_open[0] == "first" and listing_while_open[-1] == "last"
    assert "redirected" not in listing_while_open[1:-1]  # not published while being written
    assert datadir.names() == {"redirected"}


def test_writer_that_forks_never_leaves_a_partial_file_under_the_name(
    solo: tuple[Datadir, MountedPool],
) -> None:
    """A child's close-on-exec of the writer's descriptor is a close() too."""
    datadir, mounted = solo
    fd = os.open(mounted.path("image"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"first half, ")
        subprocess.run(["true"], check=True)  # fork + exec: the kernel sends a flush
        assert (datadir.path / "image").read_bytes() == b"first half, "  # whole as of then
        os.write(fd, b"second half")
        assert "image" not in datadir.names()  # being written again: hidden
        (hidden,) = incoming_files(datadir)
        assert hidden.read_bytes() == b"first half, second half"
    finally:
        os.close(fd)
    assert (datadir.path / "image").read_bytes() == b"first half, second half"
    assert incoming_files(datadir) == []


def test_kill_9_mid_write_leaves_no_file_under_the_name(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    datadirs = [Datadir(tmpfs("fast", 160), 10), Datadir(tmpfs("big", 160), 5)]
    mounted = mount_pool(datadirs)
    finished = os.urandom(3 * MiB)
    mounted.path("finished").write_bytes(finished)
    fd = os.open(mounted.path("interrupted"), os.O_CREAT | os.O_WRONLY, 0o644)
    chunk = os.urandom(MiB)
    for _ in range(50):  # half of a 100 MiB image
        os.write(fd, chunk)
    mounted.process.send_signal(signal.SIGKILL)
    mounted.process.wait(timeout=10)
    with pytest.raises(OSError) as caught:
        os.write(fd, chunk)
    # ENOTCONN through /dev/fuse; ECONNABORTED when io_uring queues were torn
    # down; ECANCELED when the request met a queue of the dead daemon in the
    # moment before its closer process (fusestore/pool/closer.py), the last
    # holder of /dev/fuse, has ended too.
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
    with pytest.raises(OSError) as caught:
        os.close(fd)  # the descriptor is released even so
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
    mounted.stop()  # fusermount3 -u of the dead mount
    assert [len(incoming_files(d)) for d in datadirs] == [1, 0]  # the crash left a hidden file

    remounted = mount_pool(datadirs)
    with pytest.raises(FileNotFoundError):
        os.stat(remounted.path("interrupted"))
    assert all("interrupted" not in d.names() for d in datadirs)
    assert [incoming_files(d) for d in datadirs] == [[], []]
    assert "removed leftover of an unfinished write" in remounted.log()
    assert f"({50 * MiB} bytes)" in remounted.log()
    assert remounted.path("finished").read_bytes() == finished
    assert sorted(os.listdir(remounted.mountpoint)) == ["finished"]


def test_durable_by_default_fsyncs_the_file_then_links_it_then_fsyncs_the_datadir(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    datadir = Datadir(tmpfs("d", 16), 0)
    mounted = mount_pool([datadir])
    calls = trace_syscalls(mounted, tmp_path, lambda: mounted.path("durable").write_bytes(b"x"))
    incoming = re.escape(f"{datadir.path}/.fusestore/incoming/")
    final = re.escape(f"{datadir.path}/durable")
    # strace -y shows the path of each descriptor: the hidden file, then the datadir.
    assert len(calls) == 3, calls
    hidden = re.fullmatch(rf"fsync\(\d+<({incoming}[^>]+)>\) = 0", calls[0])
    assert hidden is not None, calls
    assert re.fullmatch(rf'link\("{re.escape(hidden[1])}", "{final}"\) = 0', calls[1]), calls
    assert re.fullmatch(rf"fsync\(\d+<{re.escape(str(datadir.path))}>\) = 0", calls[2]), calls
    assert datadir.names() == {"durable"} and incoming_files(datadir) == []


def test_no_sync_skips_the_fsyncs(
    tmpfs: TmpfsFactory, mount_pool: MountFactory, tmp_path: Path
) -> None:
    mounted = mount_pool([Datadir(tmpfs("d", 16), 0)], "--no-sync")
    calls = trace_syscalls(mounted, tmp_path, lambda: mounted.path("fast").write_bytes(b"x"))
    assert [c for c in calls if c.startswith("link(")], calls
    assert not [c for c in calls if c.startswith(("fsync(", "fdatasync("))], calls
    assert mounted.path("fast").read_bytes() == b"x"


ATTACH_SECONDS = 30


def trace_syscalls(mounted: MountedPool, tmp_path: Path, action) -> list[str]:
    """The daemon's fsync/fdatasync/link calls while ``action`` runs, in order,
    each descriptor with its path (``strace -y``).

    ``action`` starts once strace is attached to every thread of the daemon
    (each one's TracerPid); what the daemon does for a close() is done before
    close() returns, so strace has seen it by then.
    """
    out = tmp_path / "strace.out"
    pid = mounted.process.pid
    tracer = subprocess.Popen(
        [
            "strace",
            *("-f", "-qq", "-y"),
            *("-e", "trace=fsync,fdatasync,link,linkat"),
            *("-o", str(out)),
            *("-p", str(pid)),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert eventually(lambda: traced_by(pid) == {tracer.pid}, ATTACH_SECONDS), (
            f"strace never attached to every thread of {pid}"
        )
        action()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    lines = out.read_text().splitlines()
    return [line.split(" ", 1)[1].strip() for line in lines if " " in line]


def traced_by(pid: int) -> set[int]:
    """The TracerPid of each thread of ``pid`` (0: a thread nobody traces), but
    the kernel's io_uring workers, which cannot be traced and run none of its code."""
    tracers = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("iou-"):
                continue
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        (line,) = [line for line in status.splitlines() if line.startswith("TracerPid:")]
        tracers.add(int(line.split()[1]))
    return tracers
