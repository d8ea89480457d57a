"""Where a new file goes, and in which order names are looked up.

Pure functions over the datadirs' priorities and free space, with no I/O:
the pool measures free space and asks here which datadir wins. The rules are
Glance's filesystem store: highest priority first; within one priority the
datadir with the most free space; a datadir only qualifies while its free
space exceeds the reserve (``min_free_space``) plus the bytes the file needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True)
class DatadirSpace:
    """A datadir as placement sees it: its priority and free bytes right now."""

    path: str
    priority: int
    free_bytes: int


class HasPriority(Protocol):
    """Anything ordered by priority: a configured datadir or a measured one."""

    @property
    def priority(self) -> int: ...


_T = TypeVar("_T", bound=HasPriority)


def lookup_order(datadirs: Sequence[_T]) -> list[_T]:
    """Highest priority first; equal priorities keep the order they were given in.

    The first datadir in this order that holds a name is the one reads see.
    """
    return sorted(datadirs, key=lambda datadir: -datadir.priority)


def choose_datadir(
    datadirs: Sequence[DatadirSpace], min_free_space: int, needed_bytes: int = 0
) -> DatadirSpace | None:
    """Pick the datadir for a new file, or ``None`` when no datadir has room.

    Ties in free space go to the datadir given first, so placement is
    deterministic.
    """
    floor = min_free_space + needed_bytes
    best: DatadirSpace | None = None
    for datadir in lookup_order(datadirs):
        if best is not None and datadir.priority < best.priority:
            break
        if datadir.free_bytes > floor and (best is None or datadir.free_bytes > best.free_bytes):
            best = datadir
    return best
