"""Holding a long read or copy to a rate, so that production keeps the disks.

Used by ``fusestore verify --rate`` and by moves (``--rate`` of drain and
balance).
"""

from __future__ import annotations

import time


class Pacer:
    """Holds work to ``rate`` bytes a second on average (no cap: None)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def account(self, nbytes: int) -> None:
        """Count ``nbytes`` done, sleeping as long as they came too early."""
        if self.rate is None:
            return
        self.done += nbytes
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
        elif ahead < -1:
            # Time spent not reading or copying (files skipped, planning) is
            # no credit for a burst later: at most a second's worth.
            self.start -= ahead + 1
