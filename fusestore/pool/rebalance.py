"""Which files move where when the pool drains, balances or tiers its datadirs.

Pure planning over the datadirs' sizes, free space and files, with no I/O: the
daemon measures, asks here for a :class:`Plan`, then moves the files one by
one in the plan's order (a dry run prints the plan instead). A plan simulates
the free space its own earlier moves take and give back, so no move counts on
room an earlier move has used.

A file goes where placement (README "How it behaves" → *Placement*) would
send it: the highest priority with a datadir whose free space exceeds the
reserve (``min_free_space``) plus the file's size, in it the most free space,
on a tie the datadir given first. Every plan also keeps to these:

- a file moves at most once: a second move would copy the same bytes again;
- only to a datadir that ``accepts`` files, never to the one holding it, nor
  to one already holding a file of that name (that would overwrite or make a
  duplicate);
- never so that a target's free space falls to the reserve or below.

The plans assume each datadir is its own filesystem: a move frees on its
source exactly what it takes on its target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fusestore.pool.placement import DatadirSpace, choose_datadir

MiB = 1 << 20


@dataclass(frozen=True)
class Disk:
    """A datadir as the planner sees it."""

    path: str
    priority: int  # higher wins, as in placement
    total_bytes: int  # size of its filesystem
    free_bytes: int  # available now: statvfs f_bavail * f_frsize
    accepts: bool = True  # may receive files: healthy, not retired, not being drained


@dataclass(frozen=True)
class File:
    """A pool file where it lies now."""

    name: str
    datadir: str  # path of the Disk holding it
    size: int  # bytes it needs on a target and frees on its source
    mtime_ns: int


@dataclass(frozen=True)
class Move:
    """Move ``name`` from datadir ``source`` to datadir ``target``."""

    name: str
    source: str
    target: str
    size: int


@dataclass(frozen=True)
class Plan:
    """The moves in the order to carry them out, and the files left behind.

    ``left``: files the operation wanted elsewhere but found no room for
    (only :func:`plan_fill_limit` leaves files; a drain that cannot place a
    file raises :class:`PlanError` instead).
    """

    moves: tuple[Move, ...] = ()
    left: tuple[File, ...] = ()

    def bytes_by_target(self) -> dict[str, int]:
        """Bytes each datadir receives, for a dry run's summary."""
        received: dict[str, int] = {}
        for move in self.moves:
            received[move.target] = received.get(move.target, 0) + move.size
        return received

    def bytes_by_source(self) -> dict[str, int]:
        """Bytes each datadir gives up."""
        given: dict[str, int] = {}
        for move in self.moves:
            given[move.source] = given.get(move.source, 0) + move.size
        return given


class PlanError(ValueError):
    """A plan that cannot be carried out; the message says by how much."""


def plan_drain(datadir: str, disks: Sequence[Disk], files: Sequence[File], reserve: int) -> Plan:
    """Empty ``datadir``: each of its files goes where placement puts it now.

    Largest files first, so the big ones find room while there is most of it.
    ``datadir`` is never a target, whether or not it is among ``disks``.
    Raises :class:`PlanError` before anything moves if a file fits nowhere:
    naming the bytes short, or when there is room in total but not in one
    piece, the largest files that find none (a datadir already holding a
    file's name is no place for it either).
    """
    leaving = sorted((f for f in files if f.datadir == datadir), key=lambda f: -f.size)
    targets = [disk for disk in disks if disk.accepts and disk.path != datadir]
    room = sum(max(0, disk.free_bytes - reserve) for disk in targets)
    needed = sum(f.size for f in leaving)
    holds = f"{datadir} holds {_human(needed)} in {_count(len(leaving))}"
    if needed > room:
        raise PlanError(
            f"the other datadirs can take {_human(room)} above their reserve; "
            f"{holds}: {_human(needed - room)} short"
        )
    sim = _Simulation(disks, files)
    unplaced = []
    for file in leaving:
        target = sim.choose(file, targets, reserve)
        if target is None:
            unplaced.append(file)
        else:
            sim.move(file, target)
    if unplaced:
        named = ", ".join(f"{f.name!r} ({_human(f.size)})" for f in unplaced[:5])
        more = f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else ""
        raise PlanError(
            f"the other datadirs can take {_human(room)} above their reserve and {holds}, "
            f"but no datadir has room for {_count(len(unplaced))}: {named}{more}"
        )
    return Plan(tuple(sim.moves))


def plan_balance(
    disks: Sequence[Disk], files: Sequence[File], reserve: int, tolerance: int | None = None
) -> Plan:
    """Make the pool look as placement would have built it with today's datadirs.

    1. Up: from the highest priority down, each priority takes files from
       the priorities below it while one of its datadirs has room, newest
       (latest ``mtime_ns``) first: the recently written images are the ones
       about to be booted and read, so they earn the faster, preferred disks
       when not everything fits. A file too big for the room left is passed
       over for the next one. Going top-down completes each priority in one
       pass: only moves to higher priorities, finished before, could free
       room in it.
    2. Level: within each priority, over its accepting datadirs, repeatedly
       move the largest file from the datadir with the least free space
       (or, if none of its files helps, the next least) to the one with the
       most, as long as their free space differs by more than ``tolerance``
       bytes and the file is at most half the difference, so the move
       narrows the gap without overshooting. It levels free bytes, not
       percentages, since free bytes are what placement compares.

    Files never move down a priority. ``tolerance`` ``None``: each priority
    its :func:`default_tolerance`.
    """
    if tolerance is not None and tolerance < 0:
        raise ValueError(f"tolerance {tolerance} is negative")
    sim = _Simulation(disks, files)
    priority = {disk.path: disk.priority for disk in disks}
    newest_first = sorted(
        (f for f in files if f.datadir in priority), key=lambda f: f.mtime_ns, reverse=True
    )
    tiers = sorted({disk.priority for disk in disks}, reverse=True)
    for tier in tiers:
        tier_disks = [disk for disk in disks if disk.priority == tier]
        for file in newest_first:
            if file not in sim.moved and priority[file.datadir] < tier:
                target = sim.choose(file, tier_disks, reserve)
                if target is not None:
                    sim.move(file, target)
    for tier in tiers:
        tier_disks = [disk for disk in disks if disk.priority == tier and disk.accepts]
        gap = default_tolerance(tier_disks) if tolerance is None else tolerance
        _level(sim, tier_disks, newest_first, reserve, gap)
    return Plan(tuple(sim.moves))


def default_tolerance(disks: Sequence[Disk]) -> int:
    """1% of the largest of ``disks`` (meant: one priority's), at least 1 MiB.

    Free space is measured while the pool is in use and moves while files are
    written, and new files already go to the most free datadir, narrowing any
    gap for free; copying whole images to chase the last percent is churn.
    The MiB floor keeps small (test, tmpfs) datadirs from levelling down to
    the byte.
    """
    return max(MiB, max((disk.total_bytes for disk in disks), default=0) // 100)


def plan_fill_limit(
    disks: Sequence[Disk], files: Sequence[File], reserve: int, fill_limit_percent: int
) -> Plan:
    """Keep every datadir above the lowest priority at most ``fill_limit_percent`` % full.

    For a fast disk in front of big ones: a datadir over the limit (used =
    total - free) sends its least recently modified files, the coldest, down
    to the next lower priority that has room, in it the datadir with the most
    free space. Room there means above the reserve and, unless it is the
    lowest priority, within the limit too, so a file passes on further down
    rather than pushing a middle datadir over. Priorities go bottom-up so the
    lower ones have made room before the upper ones need it. A file that fits
    nowhere below stays, listed in ``left``; it counts towards the bytes to
    shed, so ``left`` holds just the files the limit wants moved.
    """
    if not 0 <= fill_limit_percent <= 100:
        raise ValueError(f"fill limit {fill_limit_percent}% is not between 0 and 100")
    sim = _Simulation(disks, files)
    lowest = min((disk.priority for disk in disks), default=0)
    oldest_first = sorted(files, key=lambda f: f.mtime_ns)
    left: list[File] = []

    def excess(disk: Disk, adding: int = 0) -> int:
        used = disk.total_bytes - sim.free[disk.path] + adding
        return used - disk.total_bytes * fill_limit_percent // 100

    for disk in sorted(disks, key=lambda d: d.priority):
        if disk.priority == lowest:
            continue  # nothing below to send files to
        to_shed = excess(disk)
        below = [d for d in disks if d.priority < disk.priority]
        for file in oldest_first:
            if to_shed <= 0:
                break
            if file.datadir != disk.path or file in sim.moved:
                continue
            within = [d for d in below if d.priority == lowest or excess(d, file.size) <= 0]
            target = sim.choose(file, within, reserve)
            if target is None:
                left.append(file)
            else:
                sim.move(file, target)
            to_shed -= file.size
    return Plan(tuple(sim.moves), tuple(left))


class _Simulation:
    """Free space and names as the plan so far leaves them."""

    def __init__(self, disks: Sequence[Disk], files: Sequence[File]) -> None:
        self.free = {disk.path: disk.free_bytes for disk in disks}
        if len(self.free) != len(disks):
            raise ValueError("a datadir is given twice")
        self.holders: dict[str, set[str]] = {}
        for file in files:
            self.holders.setdefault(file.name, set()).add(file.datadir)
        self.moves: list[Move] = []
        self.moved: set[File] = set()

    def fits(self, file: File, disk: Disk, reserve: int) -> bool:
        return (
            disk.accepts
            and disk.path not in self.holders[file.name]
            and self.free[disk.path] > reserve + file.size
        )

    def choose(self, file: File, candidates: Iterable[Disk], reserve: int) -> str | None:
        """Placement's choice for ``file`` among ``candidates``, or ``None``."""
        spaces = [
            DatadirSpace(disk.path, disk.priority, self.free[disk.path])
            for disk in candidates
            if self.fits(file, disk, reserve)
        ]
        chosen = choose_datadir(spaces, reserve, file.size)
        return None if chosen is None else chosen.path

    def move(self, file: File, target: str) -> None:
        if file.datadir in self.free:
            self.free[file.datadir] += file.size
        self.free[target] -= file.size
        self.holders[file.name].discard(file.datadir)
        self.holders[file.name].add(target)
        self.moves.append(Move(file.name, file.datadir, target, file.size))
        self.moved.add(file)


def _level(
    sim: _Simulation, disks: Sequence[Disk], files: Sequence[File], reserve: int, tolerance: int
) -> None:
    """Step 2 of :func:`plan_balance` for one priority's accepting ``disks``.

    Ends: every move spends a file that can never move again.
    """
    on: dict[str, list[File]] = {disk.path: [] for disk in disks}
    for file in files:
        if file.datadir in on:
            on[file.datadir].append(file)
    while disks:
        most = max(disks, key=lambda d: sim.free[d.path])
        for source in sorted(disks, key=lambda d: sim.free[d.path]):
            gap = sim.free[most.path] - sim.free[source.path]
            if gap <= tolerance:
                return  # the later sources have more free space: smaller gaps
            helpful = [
                f
                for f in on[source.path]
                if f not in sim.moved and 0 < 2 * f.size <= gap and sim.fits(f, most, reserve)
            ]
            if helpful:
                sim.move(max(helpful, key=lambda f: f.size), most.path)
                break
        else:
            return


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _count(files: int) -> str:
    return "1 file" if files == 1 else f"{files} files"
