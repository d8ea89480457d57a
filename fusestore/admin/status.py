"""The running pool as ``fusestore status`` shows it.

The daemon answers with its own view — states, priorities and reserve as it
applies them right now — on a Unix socket whose path is derived from the
mountpoint (``/run/fusestore/<hash of the mountpoint>.sock``), so the status
command needs nothing but the mountpoint. The same socket takes the requests
of ``fusestore drain`` and ``balance`` (:func:`request`, ``admin/move.py``).

A socket, not a file in the datadirs or an attribute of the mount, because
what it tells is the daemon's live view: the states and the reserve it
applies right now, the checksums it has still to compute. Only the result
of the last ``fusestore verify`` of each datadir comes from a file (its
``.fusestore/verify.json``, see ``admin/verifysummary.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Any

from fusestore.admin.verifysummary import last_summary
from fusestore.pool.datadirs import State, pool_files
from fusestore.pool.pool import Pool

SCHEMA_VERSION = 1
RUNTIME_DIR = "/run/fusestore"


class NotAPool(Exception):
    """The path is not the mountpoint of a running fusestore."""


def _datadir_state(pool: Pool, datadir: Any) -> str:
    if datadir.retired:
        return "no-new-files"
    if datadir.draining:
        return "draining"
    state = datadir.assess()
    if state is State.OK and datadir.free_bytes <= pool.min_free_space:
        return "full"
    return str(state.value)


def _checksums_state(pool: Pool, datadir: Any) -> str:
    if not getattr(datadir, "xattrs", True):
        return "no user xattrs"
    return "on" if getattr(pool, "algorithms", ()) else "off"


def _checksums_pending(pool: Pool) -> int:
    for name in ("checksums_pending", "checksums_backlog"):
        method = getattr(pool, name, None)
        if method is not None:
            return int(method())
    return 0


def _hung_since(datadir: Any) -> str | None:
    """When the datadir stopped answering (ISO 8601, UTC), if it has not since."""
    return _iso(getattr(datadir, "hung_since", None))


def _iso(since: float | None) -> str | None:
    if since is None:
        return None
    return datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")


# What a datadir's row tells of its last verify (the summary file has more).
_VERIFY_KEYS = ("time", "files", "verified", "unverified", "corrupt", "changed", "unreadable")


def _last_verify(datadir: str) -> dict[str, Any] | None:
    summary = last_summary(datadir)
    if summary is None:
        return None
    return {key: summary.get(key) for key in _VERIFY_KEYS}


def collect(pool: Pool, **about: Any) -> dict[str, Any]:
    """One row per datadir and the pool's totals, as plain JSON-able data."""
    rows = []
    names: set[str] = set()
    for datadir in pool.datadirs:
        hung_since = _hung_since(datadir)
        row: dict[str, Any] = {
            "path": datadir.path,
            "priority": datadir.priority,
            "state": _datadir_state(pool, datadir),
            "size_bytes": 0,
            "free_bytes": 0,
            "files": 0,
            "file_bytes": 0,
            "checksums": _checksums_state(pool, datadir),
            "last_verify": None if hung_since else _last_verify(datadir.path),
            "hung_since": hung_since,
            # Reads and writes that failed with a disk error since the mount;
            # failing: since when it takes no new files for a failed write.
            "read_errors": datadir.read_errors,
            "write_errors": datadir.write_errors,
            "failing_since": _iso(datadir.failing_since),
        }
        if hung_since is not None:
            rows.append(row)  # not asked: it would not answer (health.py)
            continue
        try:
            vfs = os.statvfs(datadir.path)
            row["size_bytes"] = vfs.f_blocks * vfs.f_frsize
            row["free_bytes"] = vfs.f_bavail * vfs.f_frsize
            for name, st in pool_files(datadir.path):
                row["files"] += 1
                row["file_bytes"] += st.st_size
                names.add(name)
        except OSError:
            pass  # the row keeps its zeros; the state says why
        rows.append(row)
    space = pool.space()  # what df shows: each filesystem counted once
    return {
        "version": SCHEMA_VERSION,
        **about,
        "min_free_space": pool.min_free_space,
        "sync": pool.sync,
        "thin_provisioning": pool.thin,
        "passthrough_headroom": pool.passthrough_headroom,
        "datadir_timeout": pool.health.timeout,
        "checksums": list(getattr(pool, "algorithms", ())),
        "checksums_pending": _checksums_pending(pool),
        "datadirs": rows,
        "totals": {
            "size_bytes": space.total_blocks * space.block_size,
            "free_bytes": space.available_blocks * space.block_size,
            "files": sum(row["files"] for row in rows),
            "file_bytes": sum(row["file_bytes"] for row in rows),
            "names": len(names),
        },
    }


def socket_paths(mountpoint: str) -> list[str]:
    """Where the daemon serving ``mountpoint`` may answer, preferred first.

    /run/fusestore when the daemon may write there (root), else a directory
    under the temporary directory; the name is a hash of the mountpoint, short
    enough for AF_UNIX.
    """
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    bases = [RUNTIME_DIR, os.path.join(tempfile.gettempdir(), "fusestore")]
    return [os.path.join(base, f"{digest}.sock") for base in bases]


def listen(mountpoint: str) -> tuple[socket.socket, str]:
    """Bind the daemon's status socket (replacing a stale one of a dead daemon)."""
    candidates = socket_paths(mountpoint)
    path = candidates[0] if os.access("/run", os.W_OK) else candidates[1]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o666)  # status is for every user who can see the mount
    server.listen(8)
    return server, path


def connect(mountpoint: str, timeout: float = 30) -> socket.socket:
    """A connection to the control socket of the daemon serving ``mountpoint``
    (the first of :func:`socket_paths` that answers), or NotAPool."""
    if not os.path.ismount(mountpoint):
        raise NotAPool(f"{mountpoint} is not a fusestore mount (not a mountpoint)")
    problem: OSError | None = None
    for path in socket_paths(mountpoint):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.settimeout(timeout)
            client.connect(path)
            return client
        except OSError as exc:
            client.close()
            problem = problem or exc
    raise NotAPool(_no_answer(mountpoint, problem))


def _no_answer(mountpoint: str, problem: OSError | None) -> str:
    return f"{mountpoint} is not a fusestore mount, or its daemon does not answer: {problem}"


def read(mountpoint: str, timeout: float = 30) -> dict[str, Any]:
    """Ask the daemon serving ``mountpoint`` for its status."""
    with connect(mountpoint, timeout) as client:
        try:
            client.sendall(b"status\n")
            chunks = []
            while chunk := client.recv(1 << 16):
                chunks.append(chunk)
        except OSError as exc:
            raise NotAPool(_no_answer(mountpoint, exc)) from exc
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def request(
    mountpoint: str, message: dict[str, Any], timeout: float = 30
) -> Generator[dict[str, Any], None, None]:
    """Send ``message`` as one JSON line to the daemon serving ``mountpoint``;
    its answer, one JSON object per line, as they come, until it hangs up.

    Connects before returning (NotAPool if nothing answers). Then waits
    without a time limit: a job may be silent for long (planning a large
    pool). Closing the generator hangs up, which the daemon takes as the
    command going away. A line cut short by a daemon that died is dropped;
    a line that is not a JSON object (a daemon older than the request,
    which answers with its status) is NotAPool.
    """
    client = connect(mountpoint, timeout)
    try:
        client.sendall(json.dumps(message).encode() + b"\n")
    except OSError as exc:
        client.close()
        raise NotAPool(_no_answer(mountpoint, exc)) from exc
    client.settimeout(None)
    return _json_lines(client, mountpoint)


def _json_lines(client: socket.socket, mountpoint: str) -> Generator[dict[str, Any], None, None]:
    with client:
        buffer = bytearray()
        while True:
            try:
                chunk = client.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return
            # Only the new bytes are searched: a plan may be one line of megabytes.
            searched = len(buffer)
            buffer += chunk
            while (end := buffer.find(b"\n", searched)) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                searched = 0
                if line.strip():
                    yield _decode(line, mountpoint)


def _decode(line: bytes, mountpoint: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise NotAPool(
            f"the daemon serving {mountpoint} answered {line[:40]!r}, not a JSON line: "
            "it predates this command (remount the pool to run the installed fusestore)"
        )
    return event


def encode(pool: Pool, about: dict[str, Any]) -> bytes:
    return json.dumps(collect(pool, **about), indent=2).encode()


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _state_cell(row: dict[str, Any]) -> str:
    since = row.get("hung_since")
    if row["state"] == "failing":
        since = row.get("failing_since")
    return f"{row['state']} since {since}" if since else str(row["state"])


def render_table(status: dict[str, Any]) -> str:
    """A table for people; scripts should use ``--json``."""
    header = (
        *("DATADIR", "PRIORITY", "STATE", "ERRORS R/W", "SIZE", "FREE", "FILES"),
        *("USED BY FILES", "VERIFIED"),
    )
    rows = [
        (
            row["path"],
            str(row["priority"]),
            _state_cell(row),
            errors_cell(row),
            human(row["size_bytes"]),
            human(row["free_bytes"]),
            str(row["files"]),
            human(row["file_bytes"]),
            verified_cell(row),
        )
        for row in status["datadirs"]
    ]
    totals = status["totals"]
    rows.append(
        (
            "total",
            "",
            "",
            "",
            human(totals["size_bytes"]),
            human(totals["free_bytes"]),
            str(totals["files"]),
            human(totals["file_bytes"]),
            "",
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
    queues = status.get("io_uring_queues", 0)
    transport = f"io_uring ({queues} queues)" if queues else "/dev/fuse"
    lines.append(
        f"mountpoint {status.get('mountpoint', '?')}, pid {status.get('pid', '?')}, "
        f"reserve {reserve}, {sync}, {totals['names']} names, requests through {transport}"
    )
    chosen = status.get("transport")
    if chosen:  # a daemon older than the transport setting does not say
        lines.append(f"transport {chosen.get('setting')}: {chosen.get('reason')}")
    if "checksums" in status:  # a daemon older than checksums does not say
        algorithms = ", ".join(status["checksums"])
        pending = status.get("checksums_pending", 0)
        lines.append(
            f"checksums {algorithms}, {pending} file(s) pending" if algorithms else "checksums off"
        )
    if status.get("job"):  # absent or null: no drain or balance running
        lines.append(job_line(status["job"]))
    return "\n".join(lines)


def job_line(job: dict[str, Any]) -> str:
    """A running job, e.g. "draining /srv/a: 3/10 files, 123B/4.5K, started …"."""
    command = job.get("command")
    what = {"drain": f"draining {job.get('datadir')}", "balance": "balancing"}.get(
        str(command), str(command)
    )
    done = f"{job.get('files_done') or 0}/{job.get('files') or 0} files"
    moved = f"{human(job.get('bytes_done') or 0)}/{human(job.get('bytes') or 0)}"
    started = f", started {job['started']}" if job.get("started") else ""
    return f"{what}: {done}, {moved}{started}"


def errors_cell(row: dict[str, Any]) -> str:
    """Reads and writes that failed with a disk error, "0/2" ("" from a daemon
    that does not count them)."""
    if "read_errors" not in row:
        return ""
    return f"{row['read_errors']}/{row['write_errors']}"


def verified_cell(row: dict[str, Any]) -> str:
    """A datadir's last verify, compactly: "120 ok, 1 corrupt (2026-11-26)", or "never"."""
    if row.get("checksums") == "no user xattrs":
        return "no user xattrs"
    last = row.get("last_verify")
    if not last:
        return "never"
    counts = [f"{last.get('verified') or 0} ok"]
    counts += [
        f"{last[key]} {key}"
        for key in ("unverified", "corrupt", "changed", "unreadable")
        if last.get(key)
    ]
    return f"{', '.join(counts)} ({str(last.get('time') or '?')[:10]})"
