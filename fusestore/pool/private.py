"""The pool's private area inside each datadir.

``<datadir>/.fusestore/`` is a directory, so it is invisible through the
mount, and it lives on the datadir's own filesystem, so a finished file is
published under its real name with a ``link`` on that filesystem:

``mark``
    The datadir's identity and the datadirs of the pool it belongs to. A
    configured datadir without its mark is most likely the empty mountpoint of
    a disk that did not mount: it gets no new files until the mark is back.
``incoming/<instance>/``
    Files being written by one running daemon, under hidden names. The daemon
    holds an ``flock`` on ``incoming/<instance>.lock`` for as long as it runs;
    a directory whose lock nobody holds is the leftover of a crash, and the
    next mount removes it. Two daemons sharing a pool never remove each
    other's files.
``kept/``
    Data of a writer that lost a race for a name (its ``close`` got EEXIST):
    kept aside, never deleted by fusestore, for ``fusestore check`` to list.
``verify.json``
    What the last whole ``fusestore verify`` pass of this datadir found
    (``fusestore/admin/verifysummary.py``), for ``fusestore status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PRIVATE_DIR = ".fusestore"
MARK_FILE = "mark"
INCOMING_DIR = "incoming"
KEPT_DIR = "kept"


@dataclass(frozen=True)
class Mark:
    """What a datadir's mark says."""

    datadir_id: str
    members: tuple[str, ...]


class PrivateArea:
    """The ``.fusestore`` directory of one datadir, as used by one daemon instance."""

    def __init__(self, datadir: str, instance: str) -> None:
        self.datadir = datadir
        self.root = os.path.join(datadir, PRIVATE_DIR)
        self.mark_path = os.path.join(self.root, MARK_FILE)
        self.incoming_root = os.path.join(self.root, INCOMING_DIR)
        self.incoming = os.path.join(self.incoming_root, instance)
        self.kept = os.path.join(self.root, KEPT_DIR)
        self._lock_path = os.path.join(self.incoming_root, f"{instance}.lock")
        self._serial = itertools.count(1)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ marks

    def read_mark(self) -> Mark | None:
        """The mark, or None when there is none (or it is unreadable)."""
        try:
            with open(self.mark_path, encoding="utf-8") as f:
                data = json.load(f)
            return Mark(str(data["datadir_id"]), tuple(str(m) for m in data.get("members", ())))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("datadir %s: unreadable mark %s: %s", self.datadir, self.mark_path, exc)
            return None

    def has_mark(self) -> bool:
        return os.path.isfile(self.mark_path)

    def write_mark(self, members: tuple[str, ...], datadir_id: str | None = None) -> None:
        """Write the mark atomically (temporary file, fsync, rename)."""
        os.makedirs(self.root, exist_ok=True)
        payload = {
            "datadir_id": datadir_id or uuid.uuid4().hex,
            "datadir": self.datadir,
            "members": list(members),
        }
        temporary = f"{self.mark_path}.{uuid.uuid4().hex}"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, self.mark_path)
        sync_directory(self.root)

    # --------------------------------------------------------------- incoming

    @property
    def started(self) -> bool:
        return self._lock_fd is not None

    def start(self) -> None:
        """Take this instance's lock, then create its incoming directory.

        The lock comes first: another daemon's leftover sweep treats an
        incoming directory whose lock is free as abandoned.
        """
        os.makedirs(self.incoming_root, exist_ok=True)
        # Read-only, so that it never stops the filesystem from being remounted read-only.
        fd = os.open(self._lock_path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd
        os.makedirs(self.incoming, exist_ok=True)
        os.makedirs(self.kept, exist_ok=True)

    def stop(self, close: Callable[[int], None] = os.close) -> None:
        """Remove this instance's (empty) incoming directory and drop its lock
        (``close``: how to close its file, see ``closer.py``)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.incoming)
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)
        if self._lock_fd is not None:
            close(self._lock_fd)
            self._lock_fd = None

    def new_incoming_path(self) -> str:
        """A fresh hidden name for a file being written.

        A serial number is enough: the directory belongs to this daemon alone
        (its instance id is random), and counting is cheaper than a UUID.
        """
        return f"{self.incoming}/{next(self._serial)}"

    def incoming_dirs(self) -> list[tuple[str, bool]]:
        """Every daemon's incoming directory here, and whether that daemon still runs."""
        try:
            entries = sorted(os.listdir(self.incoming_root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            directory = os.path.join(self.incoming_root, entry)
            if entry.endswith(".lock") or not os.path.isdir(directory):
                continue
            alive = directory == self.incoming or lock_is_held(f"{directory}.lock")
            found.append((directory, alive))
        return found

    def remove_leftovers(self) -> list[tuple[str, int]]:
        """Delete the incoming files of daemons that are no longer running.

        Returns each removed file with its size, for the log.
        """
        removed: list[tuple[str, int]] = []
        for directory, alive in self.incoming_dirs():
            if alive:
                continue
            for path in _files_below(directory):
                try:
                    size = os.stat(path, follow_symlinks=False).st_size
                    os.unlink(path)
                except OSError as exc:
                    log.error("cannot remove leftover %s: %s", path, exc.strerror)
                    continue
                removed.append((path, size))
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(f"{directory}.lock")
        return removed

    def kept_files(self) -> list[str]:
        try:
            return [os.path.join(self.kept, name) for name in sorted(os.listdir(self.kept))]
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------- kept

    def keep_aside(self, path: str, name: str) -> str:
        """Move a losing writer's data into ``kept/`` and return where it went.

        Kept as ``<name>.<UTC time>.<random>``, the name cut short where the
        whole would not fit the filesystem's limit (a 255-byte name would
        otherwise fail here, and the bytes stay where the next mount sweeps).
        """
        os.makedirs(self.kept, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        suffix = os.fsencode(f".{stamp}.{uuid.uuid4().hex[:8]}")
        room = os.statvfs(self.kept).f_namemax - len(suffix)
        target = os.path.join(self.kept, os.fsdecode(os.fsencode(name)[:room] + suffix))
        os.rename(path, target)
        return target


def _files_below(directory: str) -> list[str]:
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
    )


def lock_is_held(lock_path: str) -> bool:
    """Whether a running daemon holds this incoming directory's lock."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sync_directory(path: str) -> None:
    """fsync a directory so that entries just created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
