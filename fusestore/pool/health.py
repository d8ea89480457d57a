"""Whether each datadir's filesystem still answers; a hung one is left alone.

Why: a datadir on network storage stops answering when its server reboots
or a link drops, and a dying disk can stall for minutes. Every request that
asked such a datadir would wait with it, and since a lookup, a create and a
listing ask every datadir, one silent datadir would stop the whole mount.

So each datadir has a *prober*, a thread of its own that asks its filesystem
a question (``statvfs``) about once a second. The prober is the only one
that must wait for the answer: when a question stays unanswered for
``datadir_timeout`` seconds, the datadir is *hung* (logged once, shown by
``fusestore status`` with since when) and the pool stops asking it — lookups,
listings and placement go on with the other datadirs, requests that need it
fail with ``EIO`` at once, and the request server abandons the requests that
were already waiting in it (``fusestore/fuse/rescue.py``). Once the prober's
question is answered, the datadir is back, without a remount, and what was
skipped is caught up (``Pool.datadir_is_back``).

Beside each prober, an indexer thread lists the datadir at start and every
``INDEX_INTERVAL`` for the name index (``nameindex.py``) that lets the pool
answer for a hung datadir's names; apart from the prober's questions, so
that listing a large datadir never counts as a question left unanswered.

And it tells when a *failing* datadir (one where a write failed with EIO,
``datadirs.py``) is healthy again: while it is failing, the prober tests it
every ``WRITE_TEST_INTERVAL`` seconds — a ``WRITE_TEST_BYTES`` file in its
incoming directory (which the leftover sweep empties after a crash), written,
``fsync``ed, dropped from the page cache, read back, compared and removed.
The first test that passes ``WRITE_TEST_QUIET`` seconds or more after the
datadir's last failed write (a failed test counts as one) makes it take new
files again; one test is made right when that time is up.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from fusestore.pool.datadirs import Datadir
from fusestore.pool.listing import regular_file_batches, regular_files
from fusestore.pool.memory import give_back_memory
from fusestore.pool.openfiles import NEW_FILE_FLAGS

log = logging.getLogger(__name__)

# Seconds between two questions to a datadir that answers.
PROBE_INTERVAL = 1.0
# Seconds between two listings of a datadir for its name index; the pool's
# own creates, renames and unlinks keep the index right in between.
INDEX_INTERVAL = 600.0
# Seconds between two looks at the probers.
_WATCH_INTERVAL = 0.25
# A failing datadir: seconds between two write tests, the seconds without a
# failed write that a passed test must come after, and the test file's size.
WRITE_TEST_INTERVAL = 10.0
WRITE_TEST_QUIET = 30.0
WRITE_TEST_BYTES = 64 << 10


class Prober:
    """One datadir's prober thread, and how long its question has waited."""

    def __init__(self, datadir: Datadir, stopping: threading.Event) -> None:
        self.datadir = datadir
        self._stopping = stopping
        self.asking_since: float | None = None  # time.monotonic() of the open question
        self.answered_at = 0.0
        self._tested_at = float("-inf")  # time.monotonic() of the last write test
        self._test_failure_logged = False
        self.thread = threading.Thread(target=self._run, name=f"prober {datadir.path}", daemon=True)
        self.indexer = threading.Thread(
            target=self._index, name=f"indexer {datadir.path}", daemon=True
        )

    def waiting(self, now: float) -> float:
        """Seconds the current question has gone unanswered (0: none open)."""
        since = self.asking_since
        return 0.0 if since is None else max(0.0, now - since)

    def _run(self) -> None:
        while True:
            self.asking_since = time.monotonic()
            try:
                self._ask()
            except Exception:  # a prober that dies would make its datadir look hung
                log.exception("datadir %s: the prober failed", self.datadir.path)
            self.answered_at = time.monotonic()
            self.asking_since = None
            if self._stopping.wait(PROBE_INTERVAL):
                return

    def _ask(self) -> None:
        path = self.datadir.path
        try:
            os.statvfs(path)
        except OSError:
            return  # an answer all the same: placement's assess() says what is wrong
        self._test_if_failing(time.monotonic())

    def _index(self) -> None:
        """The indexer thread: list the datadir for its name index now and
        then. Apart from the questions, so that a long listing (a million
        names on network storage) never makes the datadir look hung."""
        while True:
            if not self.datadir.hung:
                started = time.monotonic()
                names = itertools.chain.from_iterable(regular_file_batches(self.datadir.path))
                # Missing or failing: the next listing will tell.
                with contextlib.suppress(OSError):
                    self.datadir.names.replace(names, listing_started=started)
                give_back_memory()
            if self._stopping.wait(INDEX_INTERVAL):
                return

    def _test_if_failing(self, now: float) -> None:
        """While the datadir is failing, a write test when one is due (see above)."""
        datadir = self.datadir
        if datadir.failing_since is None or datadir.hung:
            return
        quiet_at = datadir.last_write_error + WRITE_TEST_QUIET
        due = now - self._tested_at >= WRITE_TEST_INTERVAL
        if not (due or self._tested_at < quiet_at <= now):
            return
        if not datadir.private.started:
            return  # no incoming directory to test in (its mark was missing): a reload starts it
        self._tested_at = now
        try:
            write_test(datadir)
        except OSError as exc:
            datadir.failed_write_test()
            level = logging.DEBUG if self._test_failure_logged else logging.ERROR
            self._test_failure_logged = True
            log.log(
                level,
                "datadir %s fails its write test: %s; it stays failing",
                datadir.path,
                exc.strerror or exc,
            )
            return
        if datadir.passed_write_test(now, WRITE_TEST_QUIET):
            self._test_failure_logged = False
            log.warning("datadir %s passes a write test: it takes new files again", datadir.path)


def write_test(datadir: Datadir) -> None:
    """Write, fsync, read back from the disk, compare and remove a test file
    in the datadir's incoming directory; OSError if any of it fails."""
    data = os.urandom(WRITE_TEST_BYTES)
    path = datadir.private.new_incoming_path()
    fd = os.open(path, NEW_FILE_FLAGS, 0o600)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.fsync(fd)
        # Read from the disk, not from the page cache (where it can).
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        back = os.pread(fd, len(data) + 1, 0)
    finally:
        os.close(fd)
        os.unlink(path)
    if back != data:
        raise OSError(errno.EIO, "the bytes read back differ from those written")


class HealthWatch:
    """The probers of a pool's datadirs, and the thread that judges them."""

    def __init__(
        self,
        datadirs: Callable[[], Sequence[Datadir]],
        timeout: float,
        on_hung: Callable[[Datadir], None],
        on_back: Callable[[Datadir], None],
    ) -> None:
        self._datadirs = datadirs
        self.timeout = timeout
        self._on_hung = on_hung
        self._on_back = on_back
        self._probers: dict[str, Prober] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health watch", daemon=True)

    def start(self) -> None:
        self._add_probers()
        self._thread.start()

    def stop(self) -> None:
        """Stop at once; a prober stuck in a hung filesystem is left behind (a daemon thread)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * _WATCH_INTERVAL)

    def any_hung(self) -> bool:
        return any(datadir.hung for datadir in self._datadirs())

    def _add_probers(self) -> None:
        for datadir in self._datadirs():
            if datadir.path not in self._probers:
                prober = Prober(datadir, self._stopping)
                self._probers[datadir.path] = prober
                prober.thread.start()
                prober.indexer.start()

    def _run(self) -> None:
        while not self._stopping.wait(_WATCH_INTERVAL):
            try:
                self._add_probers()  # datadirs that joined on a reload
                self.judge()
            except Exception:
                log.exception("the health watch failed to judge the datadirs")

    def judge(self) -> None:
        """Mark datadirs hung or back, by how long their probers have waited."""
        now = time.monotonic()
        for datadir in self._datadirs():
            prober = self._probers.get(datadir.path)
            if prober is None:
                continue
            waited = prober.waiting(now)
            if not datadir.hung and waited > self.timeout:
                datadir.hung_since = time.time() - waited
                datadir.hung_at = now - waited
                log.error(
                    "datadir %s is hung: its filesystem has not answered for %.0f s; "
                    "requests that need it fail with EIO, the rest of the pool goes on "
                    "without it",
                    datadir.path,
                    waited,
                )
                self._on_hung(datadir)
            elif datadir.hung and prober.answered_at > datadir.hung_at:
                lasted = now - datadir.hung_at
                datadir.hung_since = None
                log.warning(
                    "datadir %s answers again after %.0f s: it is back in the pool",
                    datadir.path,
                    lasted,
                )
                self._on_back(datadir)


# Duplicates named one by one in the log after a hang; the rest are counted.
_DUPLICATES_NAMED = 20


def catch_up(datadir: Datadir, others: Sequence[Datadir]) -> None:
    """After a hang: list the datadir anew for its name index, and report the
    names it shares with the other datadirs.

    While it hung, a name it held could not be asked for: another host of a
    shared pool may have created it in another datadir meanwhile. Such a
    name now has two files; lookups see the one in the datadir first in
    lookup order, and ``fusestore check`` lists both. Nothing is removed.
    """
    started = time.monotonic()
    try:
        names = set(regular_files(datadir.path))
    except OSError as exc:
        log.error("datadir %s: cannot list it after its hang: %s", datadir.path, exc.strerror)
        return
    datadir.names.replace(names, listing_started=started)
    shared: list[tuple[str, str]] = []
    for other in others:
        try:
            also = names.intersection(regular_files(other.path))
        except OSError:
            continue
        shared.extend((os.fsdecode(name), other.path) for name in sorted(also))
    if not shared:
        log.info("datadir %s: caught up after its hang; no name is in two datadirs", datadir.path)
        return
    for name, other_path in shared[:_DUPLICATES_NAMED]:
        log.warning(
            "after its hang, datadir %s and %s both hold %r: lookups see the copy in the "
            "datadir first in lookup order (see 'fusestore check')",
            datadir.path,
            other_path,
            name,
        )
    if len(shared) > _DUPLICATES_NAMED:
        log.warning(
            "after its hang, datadir %s shares %d more names with other datadirs",
            datadir.path,
            len(shared) - _DUPLICATES_NAMED,
        )
