"""Inode numbers for the names the kernel knows about.

The backing files live on several filesystems, so their own inode numbers can
collide; the mount hands out its own. A name keeps its number while the kernel
holds a lookup reference to it (FUSE's lookup count) and loses it on
``forget``. The table follows renames and unlinks so that a file that is open
keeps its number after its name changes or goes away.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType

ROOT_INODE = 1


class InodeTable:
    """Two-way map between mount inode numbers and pool names."""

    def __init__(self) -> None:
        self._inode_by_name: dict[str, int] = {}
        self._name_by_inode: dict[int, str | None] = {}
        self._lookups: dict[int, int] = {}
        self._next_inode = ROOT_INODE + 1

    def inode_for(self, name: str) -> int:
        """The number of ``name``, allocating one if it has none (lookup count 0)."""
        inode = self._inode_by_name.get(name)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inode_by_name[name] = inode
            self._name_by_inode[inode] = name
            self._lookups[inode] = 0
        return inode

    def named(self) -> Mapping[str, int]:
        """Every name that has a number, with its number (read-only)."""
        return MappingProxyType(self._inode_by_name)

    def remember(self, name: str) -> int:
        """``inode_for`` plus one kernel lookup reference."""
        inode = self.inode_for(name)
        self._lookups[inode] += 1
        return inode

    def name_of(self, inode: int) -> str | None:
        """The current name; ``None`` once unlinked or replaced. ENOENT if unknown."""
        try:
            return self._name_by_inode[inode]
        except KeyError:
            raise OSError(errno.ENOENT, f"unknown inode {inode}") from None

    def forget(self, inode: int, count: int) -> None:
        remaining = self._lookups.get(inode, 0) - count
        if remaining > 0:
            self._lookups[inode] = remaining
        else:
            self._drop(inode)

    def renamed(self, old: str, new: str) -> None:
        """``old`` now answers as ``new``; whatever ``new`` was is orphaned."""
        self.unlinked(new)
        inode = self._inode_by_name.pop(old, None)
        if inode is not None:
            self._inode_by_name[new] = inode
            self._name_by_inode[inode] = new

    def unlinked(self, name: str) -> None:
        inode = self._inode_by_name.pop(name, None)
        if inode is not None:
            self._name_by_inode[inode] = None

    def _drop(self, inode: int) -> None:
        name = self._name_by_inode.pop(inode, None)
        self._lookups.pop(inode, None)
        if name is not None and self._inode_by_name.get(name) == inode:
            del self._inode_by_name[name]
