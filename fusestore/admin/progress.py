"""Pacing and showing a long read of the whole pool (``fusestore verify``).

tqdm draws the bar: a well-kept, pure-Python library with no dependencies of
its own that computes rate and ETA, redraws the bar below lines printed
through it, and fits the terminal's width; nothing is drawn when stderr is not
a terminal (CI, cron, a pipe), where one line per finding is what is wanted.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Pacer:
    """Holds reads to ``rate`` bytes a second on average (no cap: None)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def account(self, nbytes: int) -> None:
        if self.rate is None:
            return
        self.done += nbytes
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
        elif ahead < -1:
            # Time spent not reading (files without checksums) is no credit
            # for a burst later: at most a second's worth.
            self.start -= ahead + 1


class Progress:
    """A tqdm bar of bytes (with files, rate and ETA) on stderr when it is a
    terminal; findings go to stdout through it so the bar is redrawn below them."""

    def __init__(self, total_bytes: int, total_files: int, show: bool) -> None:
        self.total_files = total_files
        self.files = 0
        self.bar: Any = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
                file=sys.stderr,
                desc="verify",
            )
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)

    def read(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def file_done(self, listed_size: int, read: int) -> None:
        """One more file; bytes it was listed with but not read leave the total."""
        self.files += 1
        if self.bar is not None:
            self.bar.total = max(self.bar.n, self.bar.total - max(0, listed_size - read))
            self._postfix()
            self.bar.refresh()

    def write(self, line: str, out: TextIO) -> None:
        if self.bar is None:
            print(line, file=out, flush=True)
        else:
            self.bar.write(line, file=out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
