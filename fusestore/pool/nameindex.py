"""The names a datadir may hold, known without asking it.

Why: while a datadir hangs (``health.py``) the pool cannot ask it whether it
holds a name, yet must still answer lookups and creates. A lookup that finds
a name nowhere else may say ``ENOENT`` only if the hung datadir did not hold
it either, and a create must not make a second copy of a name the hung
datadir holds. The index answers from the datadir's last full listing plus
the changes this daemon made since, so that ``cp`` of a new file goes on
while the names of the hung datadir fail with ``EIO``.

What it keeps per name is one 64-bit hash in a sorted array: 8 bytes a name
(8 MiB for a million), not the names themselves. Two names that share a hash
make one of them look taken while the datadir hangs (``EIO`` instead of
``ENOENT``): the safe direction, and rare (2^-64 a pair). A name created in
the datadir by another host since the last listing is not known: on a pool
shared by several hosts a create during a hang may then make a second copy,
which the catch-up after the hang reports (``health.py``).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from array import array
from collections.abc import Iterable


class NameIndex:
    """A datadir's names as of its last listing, and this daemon's changes since."""

    def __init__(self) -> None:
        self._hashes = array("q")
        self._listed = False
        # name -> when it changed (time.monotonic), kept until a listing that
        # started later has seen the change itself.
        self._added: dict[str, float] = {}
        self._removed: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def listed(self) -> bool:
        """Whether the datadir was ever listed: until then every name may be there."""
        return self._listed

    def replace(self, names: Iterable[bytes], listing_started: float) -> None:
        """Take a full listing that began at ``listing_started`` (time.monotonic).

        ``names`` is best an iterator over the datadir's reads: the names are
        hashed as they come, so that no more than one read's worth of them is
        alive at a time. A name's hash is in the array once per copy, which
        ``bisect`` does not mind (a datadir holds a name once anyway).
        """
        hashes = array("q", map(hash, names))
        hashes = array("q", sorted(hashes))
        with self._lock:
            self._hashes = hashes
            self._listed = True
            self._added = {n: t for n, t in self._added.items() if t >= listing_started}
            self._removed = {n: t for n, t in self._removed.items() if t >= listing_started}

    def add(self, name: str) -> None:
        """A file of that name was published in the datadir."""
        now = time.monotonic()
        with self._lock:
            self._added[name] = now
            self._removed.pop(name, None)

    def remove(self, name: str) -> None:
        """The datadir's file of that name was unlinked or renamed away."""
        now = time.monotonic()
        with self._lock:
            self._removed[name] = now
            self._added.pop(name, None)

    def may_hold(self, name: str) -> bool:
        """False only if the datadir surely held no file ``name`` when last known."""
        with self._lock:
            if name in self._added:
                return True
            if name in self._removed:
                return False
            if not self._listed:
                return True
            hashes = self._hashes
        key = hash(os.fsencode(name))
        at = bisect.bisect_left(hashes, key)
        return at < len(hashes) and hashes[at] == key

    def __len__(self) -> int:
        return len(self._hashes)
