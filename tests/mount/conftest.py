"""Fixtures of the mount tests that meet failing disks: a pool over a faulty
datadir (``tests/faulty.py``) and a plain one, for test_failures.py and
test_failing.py alike."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import Datadir, MountedPool, MountFactory, TmpfsFactory, files_below
from tests.faulty import FaultyDatadir, FaultyFactory


@contextlib.contextmanager
def closed_on_failure(fd: int) -> Iterator[int]:
    """Close ``fd`` if the block fails (so the pool can unmount); the test closes
    it otherwise, to check what close() reports."""
    try:
        yield fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


@dataclass
class FaultyPool:
    """A pool of a faulty datadir at priority 2 over a plain tmpfs at 1."""

    faulty: FaultyDatadir
    top: Datadir
    other: Datadir
    mounted: MountedPool

    def on_faulty_disk(self) -> dict[str, bytes]:
        """What the faulty datadir's disk holds, private area included, read from
        the tmpfs beneath faultyfs (no fault applies)."""
        return files_below(self.faulty.backing)


def make_rig(
    faulty_datadir: FaultyFactory,
    tmpfs: TmpfsFactory,
    mount_pool: MountFactory,
    *extra_args: str,
) -> FaultyPool:
    faulty = faulty_datadir()
    top, other = Datadir(faulty.path, 2), Datadir(tmpfs("other", 32), 1)
    return FaultyPool(faulty, top, other, mount_pool([top, other], *extra_args))


@pytest.fixture
def rig(
    faulty_datadir: FaultyFactory,  # before mount_pool: torn down after the pool
    tmpfs: TmpfsFactory,
    mount_pool: MountFactory,
) -> FaultyPool:
    return make_rig(faulty_datadir, tmpfs, mount_pool)


INCOMING = ".fusestore/incoming/*"  # the hidden names of files being written
