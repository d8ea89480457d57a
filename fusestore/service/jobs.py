"""Drain and balance: moving files between datadirs while the pool serves.

A job runs in a thread of its own in the daemon, one at a time, for as long
as the command that asked for it (``fusestore drain``/``balance``) stays
connected: a command that is stopped or killed stops its job after the file
being copied, which is abandoned (nothing lost; a rerun plans again from
what is on the disks). What moves where is decided up front by the pure
planner (``fusestore/pool/rebalance.py``) from the disks and files as they
are; each file is then moved by the steps of ``fusestore/pool/mover.py``,
holding the request lock only for the first and last, so requests never
wait behind a copy. The job reports events (``plan``, ``progress``,
``moved``, ``skipped``, ``done``) that the control socket
(``fusestore/service/control.py``) streams to the command.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from fusestore.fuse.requestlock import RequestLock
from fusestore.pool import mover, rebalance
from fusestore.pool.datadirs import Datadir, State, pool_files
from fusestore.pool.mover import MoveSkipped
from fusestore.pool.pacing import Pacer
from fusestore.pool.pool import Pool

log = logging.getLogger(__name__)

# How often a job reports progress within a file (and notices a lost command).
_PROGRESS_EVERY = 0.25
# How long a move waits for the checksums of a file just written before
# copying it (they are copied with it and check the copy).
_CHECKSUM_WAIT = 60

Event = dict[str, Any]


class JobRefused(Exception):
    """The job cannot start (the message says why); nothing changed."""


def _disks_and_files(pool: Pool) -> tuple[list[rebalance.Disk], list[rebalance.File]]:
    """What the planner needs: each datadir's space, each regular file in it."""
    disks, files = [], []
    for datadir in pool.datadirs:
        accepts = datadir.takes_new_files()
        if datadir.retired or datadir.draining:
            datadir.assess()  # not measured by takes_new_files: its space counts too
        try:
            vfs = os.statvfs(datadir.path)
            total = vfs.f_blocks * vfs.f_frsize
        except OSError:
            total = 0
        disks.append(
            rebalance.Disk(datadir.path, datadir.priority, total, datadir.free_bytes, accepts)
        )
        if datadir.state is State.VANISHED:
            continue
        try:
            files += [
                rebalance.File(name, datadir.path, st.st_size, st.st_mtime_ns)
                for name, st in pool_files(datadir.path)
            ]
        except OSError as exc:
            log.error("datadir %s cannot be listed: %s", datadir.path, exc.strerror)
    return disks, files


class Job:
    """One drain or balance, asked by one connected command."""

    def __init__(self, pool: Pool, lock: RequestLock, request: dict[str, Any]) -> None:
        self.pool = pool
        self.lock = lock
        self.command = request.get("command")
        self.dry_run = bool(request.get("dry_run"))
        rate = request.get("rate")
        self.pacer = Pacer(float(rate) if rate else None)
        self.request = request
        self.events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.drained: Datadir | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.files = self.files_done = self.bytes = self.bytes_done = 0
        self._reported = 0.0
        self.plan: rebalance.Plan | None = None

    # ------------------------------------------------------------- planning

    def make_plan(self) -> None:
        """Plan the moves, or JobRefused (nothing changed). A drain marks its
        datadir first, so that no new file lands on it while it is emptied."""
        try:
            self.plan = self._plan()
        except rebalance.PlanError as exc:
            raise JobRefused(str(exc)) from None
        except (TypeError, ValueError) as exc:  # a value no command sends
            raise JobRefused(f"bad request: {exc}") from None

    def _plan(self) -> rebalance.Plan:
        if self.command == "drain":
            path = os.path.normpath(str(self.request.get("datadir") or ""))
            try:
                datadir = self.pool.datadir(path)
            except OSError:
                known = ", ".join(d.path for d in self.pool.datadirs)
                raise JobRefused(
                    f"{path} is not a datadir of this pool (its datadirs: {known})"
                ) from None
            with self.lock.exclusive():
                was_draining, datadir.draining = datadir.draining, True
            disks, files = _disks_and_files(self.pool)
            try:
                plan = rebalance.plan_drain(path, disks, files, self.pool.min_free_space)
            except rebalance.PlanError as exc:
                datadir.draining = was_draining
                raise JobRefused(str(exc)) from None
            if self.dry_run:
                datadir.draining = was_draining
            else:
                self.drained = datadir
                log.warning("draining datadir %s: it takes no new files", path)
            return plan
        if self.command == "balance":
            disks, files = _disks_and_files(self.pool)
            tolerance = self.request.get("tolerance")
            fill_limit = self.request.get("fill_limit")
            if fill_limit is not None:
                return rebalance.plan_fill_limit(
                    disks, files, self.pool.min_free_space, int(fill_limit)
                )
            gap = None if tolerance is None else int(tolerance)
            return rebalance.plan_balance(disks, files, self.pool.min_free_space, gap)
        raise JobRefused(f"unknown command {self.command!r} (known: drain, balance)")

    # -------------------------------------------------------------- running

    def emit(self, event: Event) -> None:
        self.events.put(event)

    def cancel(self) -> None:
        """Stop after the file being copied (the command went away, or unmount)."""
        self.cancelled.set()

    def progress(self) -> Event:
        """What ``fusestore status`` shows of the running job."""
        return {
            "command": self.command,
            "datadir": self.drained.path if self.drained else None,
            "files_done": self.files_done,
            "files": self.files,
            "bytes_done": self.bytes_done,
            "bytes": self.bytes,
            "started": self.started,
        }

    def run(self) -> None:
        """Carry out the plan, reporting events; the last is ``done``, then None."""
        began = time.monotonic()
        assert self.plan is not None
        moves = self.plan.moves
        self.files, self.bytes = len(moves), sum(m.size for m in moves)
        self.emit(
            {
                "event": "plan",
                "files": self.files,
                "bytes": self.bytes,
                "by_target": self.plan.bytes_by_target(),
                "moves": [vars(move) for move in moves],
                # Files a fill limit wanted lower but found no room for.
                "left": [vars(file) for file in self.plan.left],
            }
        )
        moved = skipped = 0
        try:
            for move in [] if self.dry_run else moves:
                if self.cancelled.is_set():
                    break
                try:
                    why = self._move(move)
                except Exception as exc:  # a bug: this file stays, the job goes on
                    log.exception("moving %r from %s failed", move.name, move.source)
                    why = f"unexpected error: {exc!r}"
                self.files_done += 1
                if why is None:
                    moved += 1
                    self.emit({"event": "moved", **vars(move)})
                else:
                    skipped += 1
                    log.warning("not moved: %r in %s: %s", move.name, move.source, why)
                    self.emit(
                        {"event": "skipped", "name": move.name, "source": move.source, "why": why}
                    )
        finally:
            seconds = round(time.monotonic() - began, 3)
            done = {
                "event": "done",
                "moved": moved,
                "skipped": skipped,
                "bytes": self.bytes_done,
                "seconds": seconds,
                "dry_run": self.dry_run,
            }
            if not self.dry_run:
                log.info(
                    "%s %s: %d files moved (%d bytes in %.1f s), %d not moved",
                    self.command,
                    "stopped" if self.cancelled.is_set() else "done",
                    moved,
                    self.bytes_done,
                    seconds,
                    skipped,
                )
            self.emit(done)
            self.events.put(None)

    def _move(self, move: rebalance.Move) -> str | None:
        """Move one file; None when it moved, else why not."""
        pool = self.pool
        try:
            source, target = pool.datadir(move.source), pool.datadir(move.target)
        except OSError as exc:
            return str(exc)
        due = pool.checksummer.pending(source.path_of(move.name))
        if due is not None:
            due.wait(_CHECKSUM_WAIT)  # unlocked: its checksums travel with it
        try:
            with self.lock.exclusive():
                work = mover.prepare(pool, move.name, source, target)
        except MoveSkipped as exc:
            return str(exc)
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            mover.copy(work, pool.sync, self._copied)
            with self.lock.exclusive():
                mover.finish(pool, work)
        except MoveSkipped as exc:
            return str(exc)
        except OSError as exc:
            return f"{exc.strerror or exc} ({exc.filename or 'copy'})"
        finally:
            mover.abandon(work)  # unlocked: freeing a large source takes time
        return None

    def _copied(self, nbytes: int) -> bool:
        """After each chunk: pace, report now and then; True to stop."""
        self.bytes_done += nbytes
        self.pacer.account(nbytes)
        now = time.monotonic()
        if now - self._reported >= _PROGRESS_EVERY:
            self._reported = now
            self.emit({"event": "progress", "bytes": self.bytes_done, "files": self.files_done})
        return self.cancelled.is_set()


class Jobs:
    """At most one job at a time, for ``fusestore status`` and unmounting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Job | None = None

    def start(self, job: Job) -> None:
        """Make ``job`` the current one, or JobRefused if one is running."""
        with self._lock:
            if self.current is not None:
                raise JobRefused(
                    f"a {self.current.command} is running already (started "
                    f"{self.current.started}); one at a time"
                )
            self.current = job

    def finished(self, job: Job) -> None:
        with self._lock:
            if self.current is job:
                self.current = None

    def cancel_all(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.cancel()
