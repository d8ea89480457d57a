"""Showing a long pass over the pool (``fusestore verify``, and the
moves of ``fusestore drain``/``balance`` as the daemon reports them).

tqdm draws the bar: a well-kept, pure-Python library with no dependencies of
its own that computes rate and ETA, redraws the bar below lines printed
through it, and fits the terminal's width; nothing is drawn when stderr is not
a terminal (CI, cron, a pipe), where one line per finding is what is wanted.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from fusestore.pool.pacing import Pacer

__all__ = ["Pacer", "Progress"]  # Pacer lives with the pool: moves pace too


class Progress:
    """A tqdm bar of bytes (with files, rate and ETA) on stderr when it is a
    terminal; findings go to stdout through it so the bar is redrawn below them."""

    def __init__(
        self, total_bytes: int, total_files: int, show: bool, desc: str = "verify"
    ) -> None:
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
                desc=desc,
            )
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)

    def read(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def advance_to(self, nbytes: int) -> None:
        """Bytes done so far, for a reporter that counts totals (the daemon's moves)."""
        if self.bar is not None:
            self.bar.update(max(0, nbytes - self.bar.n))

    def forgo(self, nbytes: int) -> None:
        """Bytes that will not be done leave the total (never below what is done)."""
        if self.bar is not None:
            self.bar.total = max(self.bar.n, self.bar.total - max(0, nbytes))

    def count_file(self) -> None:
        self.files += 1
        if self.bar is not None:
            self._postfix()
            self.bar.refresh()

    def file_done(self, listed_size: int, read: int) -> None:
        """One more file; bytes it was listed with but not read leave the total."""
        self.forgo(listed_size - read)
        self.count_file()

    def write(self, line: str, out: TextIO) -> None:
        if self.bar is None:
            print(line, file=out, flush=True)
        else:
            self.bar.write(line, file=out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
