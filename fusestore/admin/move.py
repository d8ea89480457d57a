"""``fusestore drain`` and ``fusestore balance``: ask the daemon to move files, and show it.

The daemon does the moving (``service/jobs.py``): only it knows which files
are open, and it keeps serving while it copies. These commands ask for a job
on its control socket (:func:`fusestore.admin.status.request`) and show the
events it streams back, one JSON object per line: ``plan`` first, then
``progress``, ``moved`` and ``skipped`` as they happen, ``done`` last; or a
lone ``refused``. Turning events into lines, a summary, a JSON document and
an exit status is pure (:class:`Outcome`, the ``*_line`` functions,
:class:`Display`), so it is tested by feeding it lists of events.

A job lasts as long as its command's connection: Ctrl-C or killing the
command hangs up, and the daemon stops after the file being copied (which
either moves or is left where it was, as the hang-up finds it). Nothing is
lost; a rerun plans again from what is on the disks and so continues.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from fusestore.admin import status
from fusestore.admin.progress import Progress
from fusestore.admin.status import human

SCHEMA_VERSION = 1
EXIT_OK = 0
EXIT_INCOMPLETE = 1  # files skipped or left untried, or the daemon went away
EXIT_REFUSED = 2  # refused by the daemon, not a pool, bad usage
EXIT_INTERRUPTED = 130  # Ctrl-C
_MiB = 1 << 20

Event = dict[str, Any]


def drain_request(datadir: str, *, dry_run: bool = False, rate_mib: float | None = None) -> Event:
    return {"command": "drain", "datadir": datadir, "dry_run": dry_run, "rate": _rate(rate_mib)}


def balance_request(
    *,
    dry_run: bool = False,
    rate_mib: float | None = None,
    tolerance: int | None = None,
    fill_limit: int | None = None,
) -> Event:
    return {
        "command": "balance",
        "dry_run": dry_run,
        "rate": _rate(rate_mib),
        "tolerance": tolerance,
        "fill_limit": fill_limit,
    }


def _rate(rate_mib: float | None) -> int | None:
    """MiB/s as typed, bytes/s as the daemon takes them."""
    return None if rate_mib is None else max(1, round(rate_mib * _MiB))


def _files(count: int) -> str:
    return "1 file" if count == 1 else f"{count} files"


@dataclass
class Outcome:
    """What the daemon has told of one job so far; each event as sent, less its ``event`` key."""

    command: str
    plan: Event | None = None
    moved: list[Event] = field(default_factory=list)
    skipped: list[Event] = field(default_factory=list)
    done: Event | None = None
    refused: str | None = None
    interrupted: bool = False

    def add(self, event: Event) -> None:
        kind = event.get("event")
        body = {key: value for key, value in event.items() if key != "event"}
        if kind == "plan":
            self.plan = body
        elif kind == "moved":
            self.moved.append(body)
        elif kind == "skipped":
            self.skipped.append(body)
        elif kind == "done":
            self.done = body
        elif kind == "refused":
            self.refused = str(event.get("message") or "no reason given")
        # "progress", and kinds a newer daemon may add, leave nothing to keep.

    @property
    def finished(self) -> bool:
        """Whether the daemon has said its last word."""
        return self.done is not None or self.refused is not None

    @property
    def planned(self) -> int:
        return int(self.plan.get("files") or 0) if self.plan else 0

    @property
    def untried(self) -> int:
        """Planned files neither moved nor skipped (the job stopped early)."""
        if self.done is not None and self.done.get("dry_run"):
            return 0
        return max(0, self.planned - len(self.moved) - len(self.skipped))

    def exit_status(self) -> int:
        if self.refused is not None:
            return EXIT_REFUSED
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.done is None:
            return EXIT_INCOMPLETE
        if self.done.get("skipped") or self.skipped or self.untried:
            return EXIT_INCOMPLETE
        return EXIT_OK

    def document(self) -> dict[str, Any]:
        """What ``--json`` prints; ``summary`` is null when no ``done`` came."""
        return {
            "version": SCHEMA_VERSION,
            "command": self.command,
            "plan": self.plan,
            "moved": self.moved,
            "skipped": self.skipped,
            "summary": self.done,
        }

    def size_of(self, name: str, source: str) -> int:
        """The planned size of a file (a ``skipped`` event does not carry it)."""
        for move in (self.plan or {}).get("moves") or ():
            if move.get("name") == name and move.get("source") == source:
                return int(move.get("size") or 0)
        return 0


def move_line(move: Event) -> str:
    """One planned move: ``'NAME': SOURCE -> TARGET (SIZE)``."""
    return f"{move['name']!r}: {move['source']} -> {move['target']} ({human(move['size'])})"


def moved_line(event: Event) -> str:
    return (
        f"moved: {event['name']!r} {event['source']} -> {event['target']} ({human(event['size'])})"
    )


def skipped_line(event: Event) -> str:
    return f"skipped: {event['name']!r} in {event['source']}: {event.get('why') or '?'}"


def _by_target(plan: Event) -> list[tuple[str, int, int]]:
    """(target, bytes, files) per target datadir, in the order of the moves."""
    counts: dict[str, int] = {}
    sums: dict[str, int] = {}
    for move in plan.get("moves") or ():
        counts[move["target"]] = counts.get(move["target"], 0) + 1
        sums[move["target"]] = sums.get(move["target"], 0) + int(move["size"])
    sums.update(plan.get("by_target") or {})  # the daemon's word, when it gives it
    return [(target, size, counts.get(target, 0)) for target, size in sums.items()]


def plan_line(plan: Event) -> str:
    """The plan in one line, as a run starts: ``plan: 3 files (1.2G): 1.0G to /srv/b, …``."""
    if not plan.get("files"):
        return "plan: nothing to move"
    targets = ", ".join(f"{human(size)} to {target}" for target, size, _ in _by_target(plan))
    return f"plan: {_files(plan['files'])} ({human(plan.get('bytes') or 0)}): {targets}"


def dry_run_lines(plan: Event) -> list[str]:
    """The whole plan: each move, then what each target datadir receives."""
    if not plan.get("files"):
        return ["dry run: nothing to move"]
    lines = [move_line(move) for move in plan.get("moves") or ()]
    lines += [
        f"to {target}: {human(size)} ({_files(files)})" for target, size, files in _by_target(plan)
    ]
    lines.append(
        f"dry run: {_files(plan['files'])} ({human(plan.get('bytes') or 0)}) would move; "
        "nothing was changed"
    )
    return lines


def summary_line(done: Event) -> str:
    """``done: 12 files moved (1.2G in 3.4 s, 350.0M/s), 1 skipped``."""
    copied, seconds = int(done.get("bytes") or 0), float(done.get("seconds") or 0)
    rate = f", {human(round(copied / seconds))}/s" if seconds > 0 and copied else ""
    return (
        f"done: {_files(int(done.get('moved') or 0))} moved "
        f"({human(copied)} in {seconds:.1f} s{rate}), {done.get('skipped') or 0} skipped"
    )


def ending_line(outcome: Outcome, mountpoint: str) -> str | None:
    """What stderr says of a job that did not end with a plain ``done``."""
    command = outcome.command
    if outcome.refused is not None:
        return f"fusestore: {command} refused: {outcome.refused}"
    so_far = f"{len(outcome.moved)} of {_files(outcome.planned)} moved"
    if outcome.interrupted:
        return (
            f"fusestore: {command} stopped: {so_far}; the daemon stops once the file being "
            "copied has moved or is left where it was; rerun to continue"
        )
    if outcome.done is None:
        return (
            f"fusestore: the daemon serving {mountpoint} went away before the {command} was "
            f"done: {so_far}; rerun once it serves again ('fusestore check' finds a file "
            "left in two datadirs)"
        )
    if outcome.untried:
        return (
            f"fusestore: the daemon stopped the {command} with {_files(outcome.untried)} "
            "not tried (is the pool being unmounted?); rerun to continue"
        )
    return None


class Display:
    """Shows a job's events as they arrive.

    Lines go to ``out``. Off a terminal, one per moved or skipped file; on one
    (``bar``), a progress bar on stderr instead, and lines for skipped files
    only. ``as_json``: no lines, one document at the end. Either way, what
    went wrong goes to ``err`` in one line.
    """

    def __init__(
        self,
        command: str,
        *,
        dry_run: bool = False,
        as_json: bool = False,
        bar: bool = False,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.outcome = Outcome(command)
        self.dry_run = dry_run
        self.as_json = as_json
        self.bar = bar
        self.out = out
        self.err = err
        self.progress = Progress(0, 0, show=False)

    def show(self, event: Event) -> None:
        self.outcome.add(event)
        kind = event.get("event")
        if kind == "plan":
            self._plan(event)
        elif kind == "progress":
            self.progress.advance_to(int(event.get("bytes") or 0))
        elif kind == "moved":
            if not self.bar:
                self._say(moved_line(event))
            self.progress.count_file()
        elif kind == "skipped":
            self._say(skipped_line(event))
            self.progress.forgo(self.outcome.size_of(event["name"], event["source"]))
            self.progress.count_file()
        elif kind == "done":
            self.progress.advance_to(int(event.get("bytes") or 0))
            self.progress.close()
            if not event.get("dry_run"):
                self._say(summary_line(event))

    def _plan(self, plan: Event) -> None:
        if self.dry_run:
            for line in dry_run_lines(plan):
                self._say(line)
            return
        self._say(plan_line(plan))
        if self.bar and plan.get("files"):
            self.progress = Progress(
                int(plan.get("bytes") or 0),
                int(plan["files"]),
                show=True,
                desc=self.outcome.command,
            )

    def _say(self, line: str) -> None:
        if not self.as_json:
            self.progress.write(line, self.out)

    def finish(self, mountpoint: str) -> int:
        """The last words (the JSON document, what went wrong); the exit status."""
        self.progress.close()
        outcome = self.outcome
        if self.as_json and outcome.refused is None:
            print(json.dumps(outcome.document(), indent=2), file=self.out)
        line = ending_line(outcome, mountpoint)
        if line is not None:
            print(line, file=self.err, flush=True)
        return outcome.exit_status()


def follow(events: Iterable[Event], display: Display) -> None:
    """Show ``events`` until the daemon's last word (or its hanging up)."""
    for event in events:
        display.show(event)
        if display.outcome.finished:
            return


def run(
    mountpoint: str,
    request: Event,
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Ask the daemon serving ``mountpoint`` for a job, show it; the exit status."""
    display = Display(
        request["command"],
        dry_run=bool(request.get("dry_run")),
        as_json=as_json,
        bar=err.isatty(),
        out=out,
        err=err,
    )
    try:
        with contextlib.closing(status.request(mountpoint, request)) as events:
            try:
                follow(events, display)
            except KeyboardInterrupt:
                display.outcome.interrupted = True  # closing hangs up: the daemon stops
    except status.NotAPool as exc:
        display.progress.close()
        print(f"fusestore: {exc}", file=err)
        return EXIT_REFUSED
    return display.finish(mountpoint)
