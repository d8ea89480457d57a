"""The running pool as ``fusestore status`` shows it.

The daemon answers with its own view — states, priorities and reserve as it
applies them right now — through an extended attribute of the mount's root
(``user.fusestore.status``), so the status command needs no socket, works for
any user who can see the mount, and can never describe a different pool than
the one mounted there.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from fusestore.datadirs import State
from fusestore.pool import Pool

STATUS_XATTR = "user.fusestore.status"
DATADIR_XATTR = "user.fusestore.datadir"
SCHEMA_VERSION = 1


class NotAPool(Exception):
    """The path is not the mountpoint of a running fusestore."""


def _datadir_state(pool: Pool, datadir: Any) -> str:
    if datadir.retired:
        return "no-new-files"
    state = datadir.assess()
    if state is State.OK and datadir.free_bytes <= pool.min_free_space:
        return "full"
    return str(state.value)


def collect(pool: Pool, **about: Any) -> dict[str, Any]:
    """One row per datadir and the pool's totals, as plain JSON-able data."""
    rows = []
    names: set[str] = set()
    seen_devices: set[int] = set()
    total_size = total_free = 0
    for datadir in pool.datadirs:
        row: dict[str, Any] = {
            "path": datadir.path,
            "priority": datadir.priority,
            "state": _datadir_state(pool, datadir),
            "size_bytes": 0,
            "free_bytes": 0,
            "files": 0,
            "file_bytes": 0,
        }
        try:
            vfs = os.statvfs(datadir.path)
            device = os.stat(datadir.path).st_dev
            row["size_bytes"] = vfs.f_blocks * vfs.f_frsize
            row["free_bytes"] = vfs.f_bavail * vfs.f_frsize
            with os.scandir(datadir.path) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        row["files"] += 1
                        row["file_bytes"] += entry.stat(follow_symlinks=False).st_size
                        names.add(entry.name)
        except OSError:
            device = -1
        if device != -1 and device not in seen_devices:
            seen_devices.add(device)
            total_size += row["size_bytes"]
            total_free += row["free_bytes"]
        rows.append(row)
    return {
        "version": SCHEMA_VERSION,
        **about,
        "min_free_space": pool.min_free_space,
        "sync": pool.sync,
        "datadirs": rows,
        "totals": {
            "size_bytes": total_size,
            "free_bytes": total_free,
            "files": sum(row["files"] for row in rows),
            "file_bytes": sum(row["file_bytes"] for row in rows),
            "names": len(names),
        },
    }


def read(mountpoint: str) -> dict[str, Any]:
    """Ask the daemon serving ``mountpoint`` for its status."""
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotAPool(f"{mountpoint} is not a fusestore mount") from exc
        raise NotAPool(f"{mountpoint}: {exc.strerror}") from exc
    return json.loads(raw)  # type: ignore[no-any-return]


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_table(status: dict[str, Any]) -> str:
    """A table for people; scripts should use ``--json``."""
    header = ("DATADIR", "PRIORITY", "STATE", "SIZE", "FREE", "FILES", "USED BY FILES")
    rows = [
        (
            row["path"],
            str(row["priority"]),
            row["state"],
            human(row["size_bytes"]),
            human(row["free_bytes"]),
            str(row["files"]),
            human(row["file_bytes"]),
        )
        for row in status["datadirs"]
    ]
    totals = status["totals"]
    rows.append(
        (
            "total",
            "",
            "",
            human(totals["size_bytes"]),
            human(totals["free_bytes"]),
            str(totals["files"]),
            human(totals["file_bytes"]),
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    reserve = human(status["min_free_space"])
    sync = "fsync before publishing" if status["sync"] else "no fsync (--no-sync)"
    lines.append("")
    lines.append(
        f"mountpoint {status.get('mountpoint', '?')}, pid {status.get('pid', '?')}, "
        f"reserve {reserve}, {sync}, {totals['names']} names"
    )
    return "\n".join(lines)
