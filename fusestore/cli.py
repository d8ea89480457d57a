"""The ``fusestore`` command: argument parsing, logging set-up, exit codes.

Errors are turned into exit codes here and nowhere else: a bad setting
(:class:`~fusestore.config.ConfigError`) exits 2 with one line naming the
value, before anything is mounted; a mount the kernel refuses exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fusestore import __version__
from fusestore.config import ConfigError, build_pool_config

log = logging.getLogger("fusestore")

EXIT_MOUNT_FAILED = 1
EXIT_BAD_CONFIG = 2

_MOUNT_EPILOG = """\
placement: a new file goes to the highest-priority datadir whose free space
exceeds --min-free-space; among datadirs of equal priority, the one with the
most free space wins. Reads, renames and deletes go to whichever datadir holds
the file.

examples:
  fusestore mount --datadirs /srv/fast:200 --datadirs /srv/big:100 /var/lib/images
  fusestore mount --datadir /srv/images --min-free-space 4G -o allow_other /mnt/images
  fusermount3 -u /var/lib/images     # unmount; the daemon exits 0
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusestore",
        description="Pool several prioritized directories (datadirs) into one "
        "flat FUSE directory of files, placing each new file like OpenStack "
        "Glance's filesystem store.",
    )
    parser.add_argument("--version", action="version", version=f"fusestore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mount = commands.add_parser(
        "mount",
        help="mount a pool of datadirs",
        description="Mount a pool of datadirs at MOUNTPOINT. Without --foreground "
        "the command returns once the mount is usable and the daemon stays "
        "in the background.",
        epilog=_MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing directory to mount on")
    source = mount.add_argument_group("pool (give exactly one of --datadir or --datadirs)")
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
        default="0",
        help="reserve per datadir: one whose free space is at or below SIZE takes no "
        "new files (bytes, or with a K/M/G/T suffix in powers of 1024; default 0)",
    )
    mount.add_argument(
        "--no-sync",
        action="store_true",
        help="do not fsync a new file and its directory entry before publishing it at "
        "close: faster, but a power cut can lose files whose close() had returned",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    mount.add_argument(
        "-o",
        metavar="OPT[,OPT...]",
        dest="fuse_options",
        action="append",
        default=[],
        help="FUSE mount options, e.g. allow_other (needed for other users to see the "
        "mount when root runs the daemon)",
    )
    mount.add_argument("--log-file", metavar="PATH", help="also append the log to PATH")
    mount.add_argument("--debug", action="store_true", help="log every request")
    return parser


def _setup_logging(debug: bool, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s fusestore[%(process)d] %(levelname)s %(message)s",
        handlers=handlers,
    )


def _split_options(values: Sequence[str]) -> list[str]:
    return [opt for value in values for opt in value.split(",") if opt]


def _mount(args: argparse.Namespace) -> int:
    # Imported here so that --help and config errors do not need libfuse.
    from fusestore.daemon import MountError, fork_and_wait_until_ready, serve
    from fusestore.pool import Pool

    mountpoint = os.path.abspath(args.mountpoint)
    try:
        config = build_pool_config(
            args.datadir, args.datadirs, args.min_free_space, sync=not args.no_sync
        )
        if not os.path.isdir(mountpoint):
            raise ConfigError(f"mountpoint {args.mountpoint!r} is not an existing directory")
        pool = Pool(config)
    except ConfigError as exc:
        print(f"fusestore: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    on_ready = (lambda: None) if args.foreground else fork_and_wait_until_ready()
    try:
        serve(pool, mountpoint, _split_options(args.fuse_options), args.debug, on_ready)
    except MountError as exc:
        log.error("%s", exc)
        return EXIT_MOUNT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "mount":
        _setup_logging(args.debug, args.log_file)
        return _mount(args)
    raise AssertionError(f"unhandled command {args.command!r}")
