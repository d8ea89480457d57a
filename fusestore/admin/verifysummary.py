"""The last ``fusestore verify`` pass of each datadir, as ``fusestore status`` shows it.

Kept in the datadir (``.fusestore/verify.json``), not in the daemon: a scrub
runs as its own process, maybe while no daemon runs, and what it found
belongs with the disk it found it on. Replaced in one ``rename`` at the end
of a whole pass, so a scrub killed halfway leaves the last whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from fusestore.pool.private import PRIVATE_DIR

SCHEMA_VERSION = 1
SUMMARY_FILE = "verify.json"  # in each datadir's .fusestore/ area
MAX_NAMES = 100  # corrupt or unreadable names kept in a summary file


def last_summary(datadir: str) -> dict[str, Any] | None:
    """The summary the last whole pass of ``datadir`` left, or None if there is none."""
    try:
        with open(os.path.join(datadir, PRIVATE_DIR, SUMMARY_FILE), encoding="utf-8") as file:
            summary = json.load(file)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def write_summary(
    datadir: str, counts: dict[str, int], corrupt: list[str], unreadable: list[str]
) -> None:
    """Replace ``.fusestore/verify.json`` in one ``rename``; a datadir without
    a private area (never mounted) gets none."""
    private = os.path.join(datadir, PRIVATE_DIR)
    if not os.path.isdir(private):
        return
    summary = {
        "version": SCHEMA_VERSION,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **counts,
        "corrupt_names": corrupt[:MAX_NAMES],
        "unreadable_names": unreadable[:MAX_NAMES],
    }
    final = os.path.join(private, SUMMARY_FILE)
    temporary = f"{final}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
