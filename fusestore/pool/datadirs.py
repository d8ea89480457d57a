"""The configured datadirs: validation at start, marks, and health while mounted.

A datadir can stop being a good home for new files while the pool runs: its
disk fails to mount (the mark is missing), is remounted read-only, or the
directory vanishes. Health is measured when it matters — at each placement
decision — so a datadir that comes back is used again at once, without a
remount, and nothing needs a timer. Changes of state are logged loudly.

A datadir whose disk fails a write (``EIO``: not a full disk, not a refusal)
is *failing*: it takes no new files until it passes a write test that comes
long enough after its last failed write (``health.py``). Its failed reads and
writes are counted, for ``fusestore status``.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fusestore.pool.checksums import supports_xattrs
from fusestore.pool.config import ConfigError, DatadirSpec
from fusestore.pool.nameindex import NameIndex
from fusestore.pool.openfiles import OpenFile
from fusestore.pool.private import PRIVATE_DIR, PrivateArea

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Whether a datadir may take new files, and if not, why."""

    OK = "ok"
    MISSING = "missing"  # no mark: most likely a disk that is not mounted
    READ_ONLY = "read-only"
    VANISHED = "vanished"  # the directory itself cannot be reached
    HUNG = "hung"  # its filesystem does not answer (health.py)
    FAILING = "failing"  # a write failed there, and it has not passed a write test since


# Errors that say nothing against the disk: a full one (spill-over's), the
# caller's rights, an interrupted call, a change the filesystem refuses or
# cannot do, a read-only filesystem (a state of its own).
_NOT_DISK_ERRORS = frozenset(
    {
        *(errno.ENOSPC, errno.EFBIG, errno.EDQUOT),
        *(errno.EACCES, errno.EPERM, errno.EINTR, errno.EAGAIN),
        *(errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EROFS),
    }
)


def is_disk_error(exc: OSError) -> bool:
    """Whether a failed read or write says the disk failed (EIO and its kind)."""
    return exc.errno not in _NOT_DISK_ERRORS


@dataclass(eq=False)
class Datadir:
    """A validated backing directory and its private area."""

    path: str
    priority: int
    private: PrivateArea
    state: State = State.OK
    free_bytes: int = 0
    retired: bool = False  # dropped from the config on reload: no new files, files stay
    # Being drained (or drained, until the next reload): no new files.
    draining: bool = False
    # Whether its filesystem keeps user extended attributes: without them
    # files there get no checksums (and users' attributes are refused).
    xattrs: bool = True
    # Since when (time.time()) its filesystem has not answered, while it
    # does not (health.py); hung_at is the same moment in time.monotonic().
    hung_since: float | None = None
    hung_at: float = 0.0
    # The names it may hold, for while it hangs.
    names: NameIndex = field(default_factory=NameIndex, repr=False)
    # Reads and writes that failed there (is_disk_error), since the mount.
    read_errors: int = 0
    write_errors: int = 0
    # Since when (time.time()) it is failing (a write failed there), until it
    # passes a write test (health.py); last_write_error: time.monotonic() of
    # the last failed write.
    failing_since: float | None = None
    last_write_error: float = 0.0
    _errors_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _logged_state: State = field(default=State.OK, repr=False)

    @property
    def hung(self) -> bool:
        """Its filesystem does not answer now: the pool must not ask it anything."""
        return self.hung_since is not None

    def path_of(self, name: str) -> str:
        """``<datadir>/<name>`` for a checked name (one path component).

        Plain concatenation: on the lookup path, where every request builds a
        path per datadir, os.path.join cost more than the stat that follows.
        """
        return f"{self.path}/{name}"

    def count_read_error(self) -> None:
        with self._errors_lock:
            self.read_errors += 1

    def count_write_error(self, what: str) -> None:
        """A write (``what``: of which file) failed with a disk error: count it,
        and the datadir is failing from now on (logged when it starts)."""
        with self._errors_lock:
            self.write_errors += 1
            self.last_write_error = time.monotonic()
            if self.failing_since is not None:
                return
            self.failing_since = time.time()
        log.error(
            "datadir %s is failing: a write of %s failed; it takes no new files until it "
            "passes a write test",
            self.path,
            what,
        )

    def failed_write_test(self) -> None:
        """A write test (health.py) failed: the time without failed writes starts again."""
        with self._errors_lock:
            self.last_write_error = time.monotonic()

    def passed_write_test(self, started: float, quiet_for: float) -> bool:
        """A write test begun at ``started`` (time.monotonic()) passed: the datadir
        is no longer failing if no write failed there in the ``quiet_for``
        seconds before; whether it is healthy again now."""
        with self._errors_lock:
            if self.failing_since is None or started - self.last_write_error < quiet_for:
                return False
            self.failing_since = None
            return True

    def takes_new_files(self) -> bool:
        """Healthy now (measured), and neither removed from the config nor drained."""
        return not (self.retired or self.draining) and self.assess() is State.OK

    def assess(self) -> State:
        """Measure state and free space now; log a change of state.

        A hung datadir is not asked: its free space stays as last measured,
        and health.py logs its changes.
        """
        if self.hung:
            self.state = self._logged_state = State.HUNG
            return self.state
        try:
            vfs = os.statvfs(self.path)
        except OSError:
            self.state, self.free_bytes = State.VANISHED, 0
        else:
            self.free_bytes = vfs.f_bavail * vfs.f_frsize
            if not self.private.has_mark():
                self.state = State.MISSING
            elif vfs.f_flag & os.ST_RDONLY:
                self.state = State.READ_ONLY
            elif self.failing_since is not None:
                self.state = State.FAILING
            else:
                self.state = State.OK
        if self.state != self._logged_state:
            if self._logged_state in (State.HUNG, State.FAILING):
                self._logged_state = State.OK  # health.py said it is back
            if self.state is State.FAILING and self._logged_state is State.OK:
                self._logged_state = State.FAILING  # count_write_error said so
            if self.state != self._logged_state:
                self._log_change()
        return self.state

    def _log_change(self) -> None:
        if self.state is State.OK:
            log.warning("datadir %s is back: it takes new files again", self.path)
        else:
            log.error(
                "datadir %s is %s: it takes no new files until it %s%s",
                self.path,
                self.state.value,
                "passes a write test" if self.state is State.FAILING else "is back",
                " (is its disk mounted?)" if self.state is State.MISSING else "",
            )
        self._logged_state = self.state


def note_failure(datadir: Datadir | None, open_file: OpenFile, kind: str, exc: OSError) -> bool:
    """A ``kind`` ("read" or "write", fsync and fallocate included) of an open
    file failed: if the disk failed (:func:`is_disk_error`), log it once per
    file and kind and count it in the file's datadir, which a failed write
    makes failing. Whether the disk failed."""
    if not is_disk_error(exc):
        return False
    open_file.log_failure(kind, exc)
    if datadir is None:
        return True
    if kind == "read":
        datadir.count_read_error()
    else:
        datadir.count_write_error(repr(open_file.name or "(unlinked file)"))
    return True


def pool_files(path: str) -> Iterator[tuple[str, os.stat_result]]:
    """The pool's files directly in a datadir, with their stat: regular files,
    never through a symlink, not the private area; an entry gone meanwhile is
    passed over. OSError if the datadir cannot be listed.

    For whole-datadir passes (``status``, ``verify``, drain and balance);
    serving a listing is ``snapshot.py``'s job.
    """
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name == PRIVATE_DIR or not entry.is_file(follow_symlinks=False):
                continue
            try:
                yield entry.name, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def _validate(path: str) -> None:
    """Create a missing datadir and prove it can be written, or raise ConfigError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"datadir {path!r} cannot be created: {exc.strerror}") from exc
    if not os.path.isdir(path):
        raise ConfigError(f"datadir {path!r} is not a directory")
    try:
        probe_fd, probe_path = tempfile.mkstemp(prefix=".fusestore-probe-", dir=path)
        os.close(probe_fd)
        os.unlink(probe_path)
    except OSError as exc:
        raise ConfigError(f"datadir {path!r} cannot be written: {exc.strerror}") from exc


def open_datadirs(
    specs: Sequence[DatadirSpec], instance: str, existing: Sequence[Datadir] = ()
) -> list[Datadir]:
    """Validate the datadirs not in ``existing`` (creating missing ones).

    Raises ConfigError naming the first bad one, or one that is the same
    directory as another (also through a symlink); touches nothing but the
    datadirs themselves.
    """
    opened = []
    seen: dict[tuple[int, int], str] = {}
    for datadir in existing:
        try:
            st = os.stat(datadir.path)
        except OSError:
            continue
        seen[(st.st_dev, st.st_ino)] = datadir.path
    known = {datadir.path for datadir in existing}
    for spec in specs:
        if spec.path in known:
            continue
        _validate(spec.path)
        st = os.stat(spec.path)
        identity = (st.st_dev, st.st_ino)
        if identity in seen:
            raise ConfigError(f"datadir {spec.path!r} is the same directory as {seen[identity]!r}")
        seen[identity] = spec.path
        opened.append(Datadir(spec.path, spec.priority, PrivateArea(spec.path, instance)))
    return opened


def mark_and_sweep(datadirs: Sequence[Datadir]) -> None:
    """Mark the datadirs, start their private areas and remove crash leftovers.

    A datadir without a mark that another datadir's mark lists as a member of
    this pool has lost its disk (or its mark): it is left alone and takes no
    new files. Any other unmarked datadir is new to the pool and gets marked.
    """
    members = tuple(sorted(datadir.path for datadir in datadirs))
    # A hung datadir (health.py) is not asked: a reload must not wait with it.
    answering = [datadir for datadir in datadirs if not datadir.hung]
    marks = {datadir.path: datadir.private.read_mark() for datadir in answering}
    known = {member for mark in marks.values() if mark for member in mark.members}
    for datadir in answering:
        mark = marks[datadir.path]
        if mark is None and datadir.path in known:
            datadir.assess()  # logs that it is missing
            continue
        datadir.private.write_mark(members, mark.datadir_id if mark else None)
        start_private_area(datadir)
        _probe_xattrs(datadir)
        datadir.assess()


def _probe_xattrs(datadir: Datadir) -> None:
    try:
        xattrs = supports_xattrs(datadir.private.root)
    except OSError as exc:
        log.error("datadir %s: cannot probe extended attributes: %s", datadir.path, exc.strerror)
        return
    if not xattrs and datadir.xattrs:
        log.warning(
            "datadir %s keeps no user extended attributes: files there get no checksums",
            datadir.path,
        )
    datadir.xattrs = xattrs


def start_private_area(datadir: Datadir) -> None:
    """Start the datadir's private area if needed, sweeping leftovers of crashed writers."""
    if datadir.private.started:
        return
    datadir.private.start()
    for path, size in datadir.private.remove_leftovers():
        log.warning("removed leftover of an unfinished write: %s (%d bytes)", path, size)
