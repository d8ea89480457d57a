"""The ``fusestore`` command: arguments, logging set-up, exit codes.

Six subcommands — ``mount``, ``status``, ``check``, ``verify``, ``drain``,
``balance`` — plus the form that
mount(8) uses through Debian's ``mount.fuse3`` helper:
``fusestore SOURCE MOUNTPOINT -o OPTS``, where SOURCE is a config file or a
datadir list ``PATH[:PRIORITY][,PATH[:PRIORITY]…]``.

Errors become exit codes here and nowhere else: a bad setting
(:class:`~fusestore.pool.config.ConfigError`) exits 2 with one line naming the
value, before anything is mounted; a mount the kernel refuses exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fusestore import __version__
from fusestore.pool.config import (
    ConfigError,
    absolute_spec,
    escape_list_item,
    parse_checksums,
    parse_datadir_spec,
    parse_size,
    split_list,
)
from fusestore.service.selfmount import refuse_own_mountpoint
from fusestore.service.settings import DEFAULT_BUSY_POLL_US, Settings, resolve, split_mount_options

log = logging.getLogger("fusestore")

EXIT_MOUNT_FAILED = 1
EXIT_BAD_CONFIG = 2
SUBCOMMANDS = ("mount", "status", "check", "verify", "drain", "balance")
_SYSLOG_SOCKET = "/dev/log"
_LOG_FORMAT = "%(asctime)s fusestore[%(process)d] %(levelname)s %(message)s"

_MOUNT_EPILOG = """\
placement: a new file goes to the highest-priority datadir whose free space
exceeds min_free_space; among datadirs of equal priority, the one with the
most free space wins. Reads, renames and deletes go to whichever datadir holds
the file.

settings have one name everywhere: in the config file (min_free_space = "4G"),
as -o min_free_space=4G and as --min-free-space 4G. The command line and -o
override the file; a datadir list given here replaces the file's.

paths: relative ones are taken from the current directory on this command
line, from the config file's own directory in a config file, and refused in
mount(8)'s SOURCE and -o (mount(8) runs fusestore from any directory). In a
datadir list a comma separates datadirs; write a comma inside a path as \\,
A datadir may not be the mountpoint, lie below it or contain it.

examples:
  fusestore mount --datadirs /srv/fast:200 --datadirs /srv/big:100 /var/lib/images
  fusestore mount --config /etc/fusestore/images.toml /var/lib/images
  mount -t fuse.fusestore /etc/fusestore/images.toml /var/lib/images -o allow_other
  fusermount3 -u /var/lib/images     # unmount; the daemon exits 0
  kill -HUP <pid>                    # re-read the config file
"""


def _add_mount_parser(commands: Any) -> None:
    mount = commands.add_parser(
        "mount",
        help="mount a pool of datadirs",
        description="Mount a pool of datadirs at MOUNTPOINT. Without --foreground "
        "the command returns once the mount answers and the daemon stays in the "
        "background.",
        epilog=_MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing directory to mount on")
    source = mount.add_argument_group("the pool (from a config file, or --datadir/--datadirs)")
    source.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file with the settings below (re-read on SIGHUP)",
    )
    source.add_argument(
        "--source",
        metavar="SOURCE",
        help="what mount(8) passes: a config file, or datadirs as PATH[:PRIORITY][,...] "
        "(absolute paths; \\, for a comma inside one); shown as the mount's source",
    )
    source.add_argument("--datadir", metavar="PATH", help="a single datadir; created if missing")
    source.add_argument(
        "--datadirs",
        metavar="PATH[:PRIORITY]",
        action="append",
        help="a datadir with an optional priority (non-negative integer, default 0, "
        "higher wins), as in Glance's filesystem_store_datadirs; repeat for each "
        "datadir; missing ones are created",
    )
    source.add_argument(
        "--min-free-space",
        metavar="SIZE",
        help="reserve per datadir: one whose free space is at or below SIZE takes no "
        "new files (bytes, or with a K/M/G/T suffix in powers of 1024; default 0)",
    )
    source.add_argument(
        "--no-sync",
        action="store_const",
        const=True,
        help="do not fsync a new file and its directory entry before publishing it at "
        "close: faster, but a power cut can lose files whose close() had returned",
    )
    source.add_argument(
        "--checksums",
        metavar="ALGO[,ALGO...]",
        help="checksums computed for every new file and kept in its extended attributes "
        "(any of hashlib's algorithms, e.g. md5,sha256,sha512; 'none' for none; default "
        "md5,sha256). Computed in the background after the file is closed; 'fusestore "
        "verify' checks them",
    )
    source.add_argument(
        "--thin-provisioning",
        action="store_const",
        const=True,
        help="write blocks of zeros in new files as holes, as Glance's "
        "filesystem_thin_provisioning does: a raw image takes only the space of its data "
        "(default: off, zeros are written)",
    )
    source.add_argument(
        "--busy-poll",
        metavar="MICROSECONDS",
        type=_whole_number,
        help="after each reply, check for the next request this long before sleeping: "
        "much faster small I/O for at most that much CPU per request (default "
        f"{DEFAULT_BUSY_POLL_US}; 0 turns it off)",
    )
    source.add_argument(
        "--no-io-uring",
        action="store_const",
        const=True,
        help="take requests from /dev/fuse only. By default fusestore uses FUSE over "
        "io_uring where the kernel has it (Linux 6.14+), switching on the fuse module's "
        "enable_uring parameter when run as root: each CPU's requests are answered on "
        "that CPU, which halves the cost of a small request",
    )
    source.add_argument(
        "--metadata-file",
        metavar="FILE",
        help="Glance's filesystem_store_metadata_file (JSON with 'id' and 'mountpoint'); "
        "checked at start and shown by 'fusestore status'",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    mount.add_argument(
        "-o",
        metavar="OPT[,OPT...]",
        dest="mount_options",
        action="append",
        default=[],
        help="pool settings (min_free_space=4G, no_sync, datadirs=PATH:PRIO, ...) and "
        "FUSE mount options (allow_other: other users may use the mount; ro; ...); "
        "mount(8)'s own options (_netdev, nofail, noauto, x-systemd.*) are ignored",
    )
    mount.add_argument("--log-file", metavar="PATH", help="also append the log to PATH")
    mount.add_argument("--debug", action="store_const", const=True, help="log every request")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as settings are: one line on
    stderr naming it, exit status 2 (argparse alone prints its usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}")
    return int(text)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fusestore",
        description="Pool several prioritized directories (datadirs) into one "
        "flat FUSE directory of files, placing each new file like OpenStack "
        "Glance's filesystem store.",
        epilog="mount(8) form: fusestore SOURCE MOUNTPOINT [-o OPTS], with SOURCE a "
        "config file or PATH[:PRIORITY][,PATH[:PRIORITY]...]",
    )
    parser.add_argument("--version", action="version", version=f"fusestore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_mount_parser(commands)

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
    return parser


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


def _setup_logging(debug: bool, log_file: str | None, background: bool) -> None:
    """stderr (journald under systemd), plus --log-file; plus syslog for a
    background daemon without a log file, whose stderr goes nowhere once the
    mount is up."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    elif background and os.path.exists(_SYSLOG_SOCKET):
        syslog = logging.handlers.SysLogHandler(address=_SYSLOG_SOCKET)
        syslog.setFormatter(logging.Formatter("fusestore[%(process)d]: %(levelname)s %(message)s"))
        handlers.append(syslog)
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=handlers, force=True
    )
    if background and not log_file and len(handlers) == 1:
        log.warning(
            "no --log-file and no syslog (%s): the daemon's log ends once it is in the background",
            _SYSLOG_SOCKET,
        )


def _mount_settings(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """The config file to read (if any) and everything that overrides it.

    Paths typed on the command line are taken relative to the current
    directory; mount(8)'s SOURCE and ``-o`` must give absolute ones.
    """
    overrides, fuse_options = split_mount_options(args.mount_options)
    config_file = None if args.config is None else os.path.abspath(args.config)
    if args.source is not None and not os.path.isabs(args.source):
        if os.path.exists(args.source) or not ({"datadir", "datadirs"} & overrides.keys()):
            raise ConfigError(
                f"mount source {args.source!r} is a relative path; mount(8), fstab and "
                "systemd run fusestore from any directory, so give absolute paths"
            )
        # With -o datadirs=..., SOURCE is only a label, such as fstab's "none".
    elif args.source is not None:
        if os.path.isfile(args.source):
            config_file = config_file or args.source
        else:
            specs = split_list(args.source)
            for spec in specs:
                parse_datadir_spec(spec)  # refuses a relative path (``/srv/c,d``)
            overrides["datadirs"] = specs
    for key in ("metadata_file", "log_file", "datadir"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = os.path.abspath(value) if value else value  # "" stays an error
    for key in ("no_sync", "thin_provisioning", "busy_poll", "no_io_uring", "debug"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.datadirs:
        overrides["datadirs"] = [absolute_spec(spec, os.getcwd()) for spec in args.datadirs]
    if args.min_free_space is not None:
        overrides["min_free_space"] = parse_size(args.min_free_space)
    if args.checksums is not None:
        overrides["checksums"] = parse_checksums(args.checksums)
    overrides["options"] = fuse_options
    return config_file, overrides


def _fsname(args: argparse.Namespace, settings: Settings, overrides: dict[str, Any]) -> str:
    """What ``mount`` and ``df`` show as the pool's source.

    mount(8)'s own SOURCE when there is one (so that ``mount -a`` and
    ``findmnt`` match it with fstab), else the config file, else the datadir
    list: never a bare word, which mount helpers would take for a path in
    their working directory.
    """
    if args.source is not None:
        return args.source
    config = settings.pool_config()
    if settings.config_file and not ({"datadir", "datadirs"} & overrides.keys()):
        return settings.config_file  # its datadirs are the ones in use
    return ",".join(escape_list_item(f"{d.path}:{d.priority}") for d in config.datadirs)


def _check_outside_mountpoint(mountpoint: str, settings: Settings) -> None:
    refuse_own_mountpoint(
        mountpoint,
        settings.pool_config().datadirs,
        {
            "config file": settings.config_file,
            "metadata file": settings.metadata_file,
            "log file": settings.log_file,
        },
    )


def _mount(args: argparse.Namespace) -> int:
    # Imported here so that --help and the other commands do not need libfuse.
    from fusestore.pool.pool import Pool
    from fusestore.service.daemon import MountError, fork_and_wait_until_ready, serve

    # Resolved now, before it is mounted: afterwards, looking at it would ask
    # this very daemon (see selfmount.py).
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        config_file, overrides = _mount_settings(args)
        settings = resolve(config_file, overrides)
        if not os.path.isdir(mountpoint):
            raise ConfigError(f"mountpoint {args.mountpoint!r} is not an existing directory")
        _check_outside_mountpoint(mountpoint, settings)
        metadata = settings.metadata()
        fsname = _fsname(args, settings, overrides)
        pool = Pool(settings.pool_config())
    except ConfigError as exc:
        print(f"fusestore: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _setup_logging(settings.debug, settings.log_file, background=not args.foreground)

    def reload() -> None:
        try:
            fresh = resolve(config_file, overrides)
            _check_outside_mountpoint(mountpoint, fresh)
            fresh.metadata()
            pool.reconfigure(fresh.pool_config())
        except ConfigError as exc:
            log.error("reload rejected, the running settings stay: %s", exc)
            return
        log.info(
            "reloaded %s: datadirs %s, min_free_space %d bytes, checksums %s",
            config_file,
            ", ".join(f"{d.path} (priority {d.priority})" for d in pool.datadirs if not d.retired),
            pool.min_free_space,
            "+".join(pool.algorithms) or "none",
        )

    on_ready = (lambda: None) if args.foreground else fork_and_wait_until_ready()
    about = {"config_file": config_file, "metadata": metadata}
    try:
        serve(
            pool,
            mountpoint,
            settings.options,
            settings.debug,
            settings.busy_poll,
            on_ready,
            reload if config_file else None,
            about,
            io_uring=not settings.no_io_uring,
            fsname=fsname,
        )
    except MountError as exc:
        log.error("%s", exc)
        return EXIT_MOUNT_FAILED
    return 0


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


def _as_subcommand(argv: list[str]) -> list[str]:
    """Turn mount(8)'s ``SOURCE MOUNTPOINT -o OPTS`` into ``mount --source …``."""
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        return ["mount", "--source", argv[0], *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _as_subcommand(list(sys.argv[1:] if argv is None else argv))
    args = _build_parser().parse_args(arguments)
    if args.command == "mount":
        return _mount(args)
    if args.command == "status":
        return _status(args)
    if args.command == "check":
        return _check(args)
    if args.command == "verify":
        return _verify(args)
    if args.command in ("drain", "balance"):
        return _move(args)
    raise AssertionError(f"unhandled command {args.command!r}")
