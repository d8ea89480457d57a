"""Random sequences of file operations through the mount, checked against a model.

Hypothesis drives create, write, truncate, rename, unlink, read and fsync
against a dict of name -> bytes. The top datadir is small, so files spill over
to the lower one in the middle of writes.

What fsync promises is checked where it can be without a power cut: the
daemon gets the request (in its ``--debug`` log: the kernel answers fsync
itself, with 0, once a daemon has said it does not implement it) and, when
fsync returns 0, the one datadir holding the file holds every byte written
to it, before the descriptor is closed.
"""

from __future__ import annotations

import errno
import os
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.conftest import Datadir, MiB, MountedPool, MountFactory, TmpfsFactory

NAMES = st.sampled_from(["alpha", "beta", "gamma", "delta"])
SIZES = st.integers(min_value=0, max_value=3 * MiB // 2) | st.sampled_from(
    [MiB // 2, MiB, 3 * MiB // 2]
)
OFFSETS = st.integers(min_value=0, max_value=2 * MiB)


def blob(size: int, seed: int) -> bytes:
    return (seed.to_bytes(2, "big") * (size // 2 + 1))[:size]


class PoolModel(RuleBasedStateMachine):
    mounted: MountedPool

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.open_fds: dict[int, str | None] = {}  # long-lived handles -> the name they follow
        self.log_read = 0  # how much of the daemon's log fsyncs_logged has read
        for name in os.listdir(self.mounted.mountpoint):
            os.unlink(self.mounted.path(name))

    def path(self, name: str) -> str:
        return str(self.mounted.path(name))

    def expect_errno(self, code: int, call, *args) -> None:
        try:
            call(*args)
        except OSError as exc:
            assert exc.errno == code, exc
        else:
            raise AssertionError(f"{call.__name__}{args} should fail with {errno.errorcode[code]}")

    @rule(name=NAMES, size=SIZES, seed=st.integers(0, 65535))
    def create(self, name: str, size: int, seed: int) -> None:
        if name in self.files:
            self.expect_errno(errno.EEXIST, os.open, self.path(name), os.O_CREAT | os.O_EXCL)
            return
        data = blob(size, seed)
        fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.files[name] = data

    @rule(name=NAMES, offset=OFFSETS, size=SIZES, seed=st.integers(0, 65535))
    def write(self, name: str, offset: int, size: int, seed: int) -> None:
        if name not in self.files:
            self.expect_errno(errno.ENOENT, os.open, self.path(name), os.O_WRONLY)
            return
        data = blob(size, seed)
        fd = os.open(self.path(name), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.apply_write(name, offset, data)

    def apply_write(self, name: str | None, offset: int, data: bytes) -> None:
        if name is None or not data:
            return  # an orphaned handle: its file is gone from the pool
        padded = self.files[name] + b"\0" * max(0, offset - len(self.files[name]))
        self.files[name] = padded[:offset] + data + padded[offset + len(data) :]

    @rule(name=NAMES)
    def open_and_keep(self, name: str) -> None:
        if name in self.files and len(self.open_fds) < 3:
            self.open_fds[os.open(self.path(name), os.O_RDWR)] = name

    @rule(data=st.data(), offset=OFFSETS, size=SIZES, seed=st.integers(0, 65535))
    def write_through_kept_handle(self, data, offset: int, size: int, seed: int) -> None:
        if not self.open_fds:
            return
        fd = data.draw(st.sampled_from(sorted(self.open_fds)))
        payload = blob(size, seed)
        assert os.pwrite(fd, payload, offset) == size
        self.apply_write(self.open_fds[fd], offset, payload)

    @rule(data=st.data())
    def close_kept_handle(self, data) -> None:
        if self.open_fds:
            fd = data.draw(st.sampled_from(sorted(self.open_fds)))
            del self.open_fds[fd]
            os.close(fd)

    def teardown(self) -> None:
        for fd in self.open_fds:
            os.close(fd)

    @rule(name=NAMES, size=SIZES)
    def truncate(self, name: str, size: int) -> None:
        if name not in self.files:
            self.expect_errno(errno.ENOENT, os.truncate, self.path(name), size)
            return
        os.truncate(self.path(name), size)
        old = self.files[name]
        self.files[name] = old[:size] + b"\0" * max(0, size - len(old))

    @rule(old=NAMES, new=NAMES)
    def rename(self, old: str, new: str) -> None:
        if old not in self.files:
            self.expect_errno(errno.ENOENT, os.rename, self.path(old), self.path(new))
            return
        os.rename(self.path(old), self.path(new))
        self.files[new] = self.files.pop(old)
        if old != new:
            self.follow(new, None)
            self.follow(old, new)

    def follow(self, name: str, now: str | None) -> None:
        """Kept handles of ``name`` now follow ``now`` (None: orphaned)."""
        for fd, followed in self.open_fds.items():
            if followed == name:
                self.open_fds[fd] = now

    @rule(name=NAMES)
    def unlink(self, name: str) -> None:
        if name not in self.files:
            self.expect_errno(errno.ENOENT, os.unlink, self.path(name))
            return
        os.unlink(self.path(name))
        del self.files[name]
        self.follow(name, None)

    def fsyncs_logged(self, inode: int) -> int:
        """FSYNC requests for ``inode`` in the daemon's log since the last call."""
        with open(self.mounted.log_path, "rb") as log:
            log.seek(self.log_read)
            new = log.read()
        self.log_read += len(new)
        return len(re.findall(rb"DEBUG fsync\(inode=%d, " % inode, new))

    @rule(data=st.data(), name=NAMES, datasync=st.booleans())
    def fsync(self, data, name: str, datasync: bool) -> None:
        """fsync or fdatasync, through a kept handle of the file or a new one."""
        if name not in self.files:
            self.expect_errno(errno.ENOENT, os.open, self.path(name), os.O_RDWR)
            return
        kept = sorted(fd for fd, followed in self.open_fds.items() if followed == name)
        fd = data.draw(st.sampled_from([None, *kept]))
        own = fd is None
        if own:
            fd = os.open(self.path(name), os.O_RDWR)
        try:
            self.fsyncs_logged(0)  # skip what came before
            (os.fdatasync if datasync else os.fsync)(fd)
            assert self.fsyncs_logged(os.fstat(fd).st_ino) == 1
            (holder,) = self.mounted.holders(name)
            assert (holder / name).read_bytes() == self.files[name]
        finally:
            if own:
                os.close(fd)

    @rule(name=NAMES)
    def read(self, name: str) -> None:
        if name not in self.files:
            self.expect_errno(errno.ENOENT, os.open, self.path(name), os.O_RDONLY)
            return
        with open(self.path(name), "rb") as f:
            assert f.read() == self.files[name]

    @invariant()
    def listing_matches(self) -> None:
        assert sorted(os.listdir(self.mounted.mountpoint)) == sorted(self.files)

    @invariant()
    def each_file_lives_in_exactly_one_datadir_and_nothing_else_does(self) -> None:
        # A new file is in its datadir when close() returns (README, "Crash-safe publication").
        for name in self.files:
            (holder,) = self.mounted.holders(name)
            assert (holder / name).stat().st_size == len(self.files[name]), name
        in_datadirs = set().union(*(datadir.names() for datadir in self.mounted.datadirs))
        assert in_datadirs == set(self.files)


def run_model(mounted: MountedPool) -> None:
    PoolModel.mounted = mounted
    run_state_machine_as_test(
        PoolModel,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,  # the same sequences every run: a failure comes back
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_random_operations_match_the_model(tmpfs: TmpfsFactory, mount_pool: MountFactory) -> None:
    run_model(mount_pool([Datadir(tmpfs("top", 64), 10), Datadir(tmpfs("low", 64), 5)], "--debug"))


def test_random_operations_match_the_model_with_spill_overs(
    tmpfs: TmpfsFactory, mount_pool: MountFactory
) -> None:
    run_model(mount_pool([Datadir(tmpfs("tiny", 1), 10), Datadir(tmpfs("low", 96), 5)], "--debug"))
