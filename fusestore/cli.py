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
import faulthandler
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from fusestore import __version__, admincommands
from fusestore.pool.config import (
    DEFAULT_DATADIR_TIMEOUT,
    ConfigError,
    absolute_spec,
    escape_list_item,
    parse_checksums,
    parse_datadir_spec,
    parse_seconds,
    parse_size,
    split_list,
)
from fusestore.service.selfmount import refuse_own_mountpoint
from fusestore.service.settings import (
    DEFAULT_BUSY_POLL_US,
    Settings,
    parse_transport,
    resolve,
    split_mount_options,
)

log = logging.getLogger("fusestore")

EXIT_MOUNT_FAILED = 1
EXIT_BAD_CONFIG = 2
SUBCOMMANDS = ("mount", *admincommands.COMMANDS)
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
        "--passthrough-headroom",
        metavar="SIZE",
        help="an existing file opened for writing in a datadir with more than SIZE free "
        "above the reserve is written by the kernel straight to the disk (FUSE "
        "passthrough, as fast as the disk); a write of it that fills the datadir then gets "
        "ENOSPC instead of moving the file to another datadir. New files always come to "
        "fusestore. 0 turns it off (default 1G)",
    )
    source.add_argument(
        "--datadir-timeout",
        metavar="SECONDS",
        help="a datadir whose filesystem leaves a request unanswered this long counts as "
        "hung: requests that need it fail with EIO, the rest of the pool goes on without "
        f"it until it answers again (default {DEFAULT_DATADIR_TIMEOUT:g})",
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
        "--transport",
        metavar="auto|io_uring|devfuse",
        help="how the kernel's requests reach fusestore: FUSE over io_uring (a queue per "
        "CPU, answered on that CPU; Linux 6.14+, whose fuse module's enable_uring "
        "fusestore switches on when run as root) or /dev/fuse (one thread, busy polling). "
        "Which is faster depends on the machine (a VM's costly cross-CPU wake-ups favour "
        "io_uring, a loaded CPU favours /dev/fuse), so 'auto', the default, times a few "
        "thousand stats through each on a probe mount before mounting (about 0.3 s) and "
        "takes the faster; 'status' and the log say which runs and why",
    )
    source.add_argument(
        "--no-io-uring",
        dest="transport",
        action="store_const",
        const="devfuse",
        help="the same as --transport devfuse",
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

    admincommands.add_parsers(commands)
    return parser


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
    for key in ("no_sync", "thin_provisioning", "busy_poll", "debug"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.datadirs:
        overrides["datadirs"] = [absolute_spec(spec, os.getcwd()) for spec in args.datadirs]
    if args.transport is not None:
        overrides["transport"] = parse_transport(args.transport)
    if args.min_free_space is not None:
        overrides["min_free_space"] = parse_size(args.min_free_space)
    if args.checksums is not None:
        overrides["checksums"] = parse_checksums(args.checksums)
    if args.passthrough_headroom is not None:
        overrides["passthrough_headroom"] = parse_size(args.passthrough_headroom)
    if args.datadir_timeout is not None:
        overrides["datadir_timeout"] = parse_seconds("datadir_timeout", args.datadir_timeout)
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
    # `kill -USR1 PID` prints every thread's Python stack on stderr: where a
    # daemon waits (a hung datadir?) without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def reload() -> None:
        try:
            fresh = resolve(config_file, overrides)
            _check_outside_mountpoint(mountpoint, fresh)
            fresh.metadata()
            pool.reconfigure(fresh.pool_config())
        except ConfigError as exc:
            log.error("reload rejected, the running settings stay: %s", exc)
            return
        if fresh.transport != settings.transport:
            # A mount cannot leave the io_uring queues, nor join them later.
            log.warning(
                "transport = %s takes effect at the next mount; this one keeps its transport",
                fresh.transport,
            )
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
            transport=settings.transport,
            fsname=fsname,
        )
    except MountError as exc:
        log.error("%s", exc)
        return EXIT_MOUNT_FAILED
    hung = [datadir.path for datadir in pool.datadirs if datadir.hung]
    if hung or _threads_left_waiting():
        # Threads stuck in a hung datadir (fusestore/fuse/rescue.py), which the
        # interpreter would wait for at exit: exit without them. Its files are
        # closed by the closer process, which shares the descriptors
        # (fusestore/pool/closer.py): the daemon's exit closes none of them.
        log.warning(
            "exiting without waiting for %s", ", ".join(hung) or "threads in a hung datadir"
        )
        logging.shutdown()
        os._exit(0)
    return 0


def _threads_left_waiting(grace: float = 1.0) -> bool:
    """Whether a thread that the interpreter waits for at exit is still busy."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return True
    return False


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
    if args.command in admincommands.COMMANDS:
        return admincommands.run(args)
    raise AssertionError(f"unhandled command {args.command!r}")
