"""What the pool's filesystems hold: ``statfs`` totals and the longest name.

The pool's size is its datadirs' filesystems added up, each filesystem once
(several datadirs may share one). The longest name a new file may have is
the smallest any datadir allows, since a file may be published in, or moved
to, any of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The longest file name Linux has (bytes): the kernel does not check names for
# FUSE, so the pool must.
NAME_MAX = 255
_BLOCK_SIZE = 4096


@dataclass(frozen=True)
class PoolSpace:
    """What ``statfs`` reports: the datadirs' distinct filesystems added up."""

    block_size: int
    total_blocks: int
    free_blocks: int
    available_blocks: int
    total_inodes: int
    free_inodes: int
    name_max: int


def name_limit(paths: Sequence[str]) -> int:
    """The longest name (in bytes) every one of ``paths``' filesystems can hold."""
    limits = []
    for path in paths:
        try:
            limits.append(os.statvfs(path).f_namemax)
        except OSError:
            continue  # a datadir that is not there now is checked when it is used
    return min([NAME_MAX, *limits])


def measure(paths: Sequence[str], name_max: int) -> PoolSpace:
    """Sum the filesystems of ``paths``, each filesystem once; ``name_max`` is
    the name limit the pool enforces (:func:`name_limit`)."""
    total = free = available = inodes = free_inodes = 0
    seen: set[int] = set()
    for path in paths:
        try:
            device = os.stat(path).st_dev
            vfs = os.statvfs(path)
        except OSError as exc:
            log.error("cannot measure datadir %s: %s", path, exc.strerror)
            continue
        if device in seen:
            continue
        seen.add(device)
        total += vfs.f_blocks * vfs.f_frsize
        free += vfs.f_bfree * vfs.f_frsize
        available += vfs.f_bavail * vfs.f_frsize
        inodes += vfs.f_files
        free_inodes += vfs.f_ffree
    return PoolSpace(
        block_size=_BLOCK_SIZE,
        total_blocks=total // _BLOCK_SIZE,
        free_blocks=free // _BLOCK_SIZE,
        available_blocks=available // _BLOCK_SIZE,
        total_inodes=inodes,
        free_inodes=free_inodes,
        name_max=name_max,
    )
