"""The subcommands that look at or change a running pool: their arguments and runs.

``status``, ``check``, ``verify``, ``drain`` and ``balance``; ``fusestore/cli.py``
keeps ``mount``, logging and the dispatch. Each run imports its admin module
only when called, so ``fusestore mount`` loads none of them. Exit codes as in
``cli.py``: 2 for a bad argument or setting (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fusestore.pool.config import ConfigError, parse_size

COMMANDS = ("status", "check", "verify", "drain", "balance")
EXIT_BAD_CONFIG = 2  # the same as fusestore.cli's


def add_parsers(commands: Any) -> None:
    """Add the subcommands to ``fusestore``'s parser."""
    status = commands.add_parser(
        "status",
        help="show each datadir of a mounted pool",
        description="Ask the daemon serving MOUNTPOINT for each datadir's priority, "
        "state (ok, full, read-only, missing, vanished, no-new-files, draining), size, free "
        "space and files, and the pool's totals.",
    )
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="stable JSON for scripts")

    check = commands.add_parser(
        "check",
        help="find duplicates, leftovers and foreign entries in a pool's datadirs",
        description="Look through the datadirs of a pool — given as a mountpoint, a "
        "config file or PATH[:PRIORITY][,...] — for names in more than one datadir, "
        "leftovers of unfinished writes, data kept aside after a lost race, entries "
        "the pool ignores (directories, symlinks, special files) and datadirs "
        "without their mark. Exits 0 only when all is clean.",
    )
    check.add_argument("target", metavar="SOURCE|MOUNTPOINT")
    check.add_argument(
        "--fix",
        action="store_true",
        help="remove shadowed duplicates (the copy that reads through the mount wins) "
        "and leftovers of writers that are no longer running; print what was done",
    )
    _add_verify_parser(commands)
    _add_move_parsers(commands)


def _add_verify_parser(commands: Any) -> None:
    verify = commands.add_parser(
        "verify",
        help="read every file back and compare it with its stored checksums",
        description="Read every file in the datadirs of a pool — given as a mountpoint, "
        "a config file or PATH[:PRIORITY][,...] — and compare it with the checksums "
        "stored with it. A file that matches gets a verified stamp. Other bytes with "
        "the same size and mtime are corrupt (rot); other bytes with another size or "
        "mtime are changed (written outside the pool). Files without checksums are "
        "unverified: counted, not read. Exits 0 only when no file is corrupt, changed "
        "or unreadable, 1 otherwise, 2 for bad usage. Safe to kill at any point.",
    )
    verify.add_argument("target", metavar="MOUNTPOINT|SOURCE")
    verify.add_argument("--datadir", metavar="PATH", help="verify only this datadir of the pool")
    verify.add_argument(
        "--rate",
        metavar="MIB/S",
        type=_positive_number,
        help="read at most this many MiB per second (default: as fast as the disks go)",
    )
    verify.add_argument(
        "--json", action="store_true", help="one JSON document of findings and counts"
    )
    verify.add_argument(
        "--fill",
        action="store_true",
        help="compute and store the checksums of files that have none, and of changed "
        "files (accepting their new bytes); the pool's algorithms, asked of the daemon "
        "when given its mountpoint, else md5,sha256",
    )


_DRAIN_DESCRIPTION = """\
Move every file off DATADIR, while the pool serves, to where placement puts
it now: the highest-priority other datadir with room above the reserve, in
it the one with the most free space. DATADIR takes no new files from the
start of the drain until the next reload or restart; then take it out of
the config (or leave it in, to use it again). Refused, naming the
shortfall, when its files do not fit in the other datadirs.
"""

_BALANCE_DESCRIPTION = """\
Move files, while the pool serves, up to higher-priority datadirs that have
room above the reserve (the newest files first), and even out the free
space of the datadirs of each priority to within --tolerance. Files never
move down a priority.

With --fill-limit PERCENT it does something else: the classic fast disk in
front of big ones. Every datadir that has a lower-priority one below it is
kept at most PERCENT full by moving its least recently modified files down
a tier.
"""

_MOVE_EPILOG = """\
The daemon serving MOUNTPOINT moves the files while the pool serves: a file
open for writing, or changed during its copy, is skipped (rerun later), and
every copy is read back and compared before the original is removed.
Ctrl-C stops it after the file being copied (which moves, or is left where
it was); nothing is lost and a rerun continues. Only root or the
daemon's user may ask; one drain or balance at a time.

output: a line per file moved or skipped and a summary (on a terminal: a
progress bar, and lines for skipped files). exit status: 0 all moved (or
--dry-run), 1 files skipped or the daemon went away, 2 refused or bad
usage, 130 interrupted.
"""


def _add_move_parsers(commands: Any) -> None:
    drain = commands.add_parser(
        "drain",
        help="move every file off a datadir, while the pool serves",
        description=_DRAIN_DESCRIPTION,
        epilog=_MOVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drain.add_argument("mountpoint", metavar="MOUNTPOINT")
    drain.add_argument("datadir", metavar="DATADIR", help="the datadir of the pool to empty")
    balance = commands.add_parser(
        "balance",
        help="move files up to higher-priority datadirs and even out free space",
        description=_BALANCE_DESCRIPTION,
        epilog=_MOVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    balance.add_argument("mountpoint", metavar="MOUNTPOINT")
    balance.add_argument(
        "--tolerance",
        metavar="SIZE",
        type=_size,
        help="free space of datadirs of one priority may differ by this much (bytes, or "
        "with a K/M/G/T suffix; default: 1%% of the largest datadir of that priority, "
        "at least 1M)",
    )
    balance.add_argument(
        "--fill-limit",
        metavar="PERCENT",
        type=_percent,
        help="instead: keep every datadir that has a lower-priority one below it at most "
        "PERCENT full (1-100), moving its least recently modified files down a tier",
    )
    for parser in (drain, balance):
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the plan (each move, then the bytes each datadir would receive) "
            "and change nothing",
        )
        parser.add_argument(
            "--rate",
            metavar="MIB/S",
            type=_positive_number,
            help="copy at most this many MiB per second (default: as fast as the disks go)",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="one JSON document at the end: the plan, files moved and skipped, summary",
        )


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _percent(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole percentage from 1 to 100, not {text!r}")
    return int(text)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args`` names; its exit status."""
    if args.command == "status":
        return _status(args)
    if args.command == "check":
        return _check(args)
    if args.command == "verify":
        return _verify(args)
    return _move(args)


def _status(args: argparse.Namespace) -> int:
    from fusestore.admin import status

    try:
        report = status.read(args.mountpoint)
    except status.NotAPool as exc:
        print(f"fusestore: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else status.render_table(report))
    return 0


def _check(args: argparse.Namespace) -> int:
    from fusestore.admin import check

    try:
        datadirs = check.datadirs_of(args.target)
    except ConfigError as exc:
        print(f"fusestore: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    findings = check.scan(datadirs)
    for line in check.describe(findings):
        print(line)
    if args.fix:
        for line in check.fix(findings):
            print(line)
        findings = check.scan(datadirs)
    return 0 if findings.clean else 1


def _verify(args: argparse.Namespace) -> int:
    from fusestore.admin import verify

    try:
        datadirs = verify.datadirs_to_verify(args.target, args.datadir)
        algorithms = verify.fill_algorithms(args.target) if args.fill else ()
    except ConfigError as exc:
        print(f"fusestore: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        tally = verify.run(
            datadirs, fill=args.fill, algorithms=algorithms, rate_mib=args.rate, as_json=args.json
        )
    except KeyboardInterrupt:
        print("fusestore: verify interrupted; this pass leaves no summary", file=sys.stderr)
        return 130
    return 0 if tally.ok else 1


def _move(args: argparse.Namespace) -> int:
    from fusestore.admin import move

    if args.command == "drain":
        request = move.drain_request(
            os.path.abspath(args.datadir), dry_run=args.dry_run, rate_mib=args.rate
        )
    else:
        request = move.balance_request(
            dry_run=args.dry_run,
            rate_mib=args.rate,
            tolerance=args.tolerance,
            fill_limit=args.fill_limit,
        )
    try:
        return move.run(args.mountpoint, request, as_json=args.json)
    except KeyboardInterrupt:  # a second Ctrl-C, while the first one's words were printed
        return move.EXIT_INTERRUPTED
