"""Run the FUSE session: mount, serve requests, unmount on signal or umount.

Also owns going to the background the way mount helpers are expected to: the
command that starts the daemon returns only once the mount answers, and
returns the daemon's error and exit status if mounting failed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable

import pyfuse3
import trio

from fusestore.fs import Operations
from fusestore.pool import Pool

log = logging.getLogger(__name__)

MOUNT_OPTIONS = frozenset({"fsname=fusestore", "subtype=fusestore", "default_permissions"})


class MountError(RuntimeError):
    """The kernel or libfuse refused the mount."""


def serve(
    pool: Pool,
    mountpoint: str,
    fuse_options: Iterable[str] = (),
    debug: bool = False,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Mount the pool and serve it until unmounted or signalled (SIGTERM, SIGINT)."""
    pool.start()
    operations = Operations(pool, debug=debug)
    options = set(MOUNT_OPTIONS) | set(fuse_options)
    if debug:
        options.add("debug")
    try:
        pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as exc:
        pool.stop()
        raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
    log.info(
        "mounted %s with datadirs %s, min_free_space %d bytes, %s",
        mountpoint,
        ", ".join(f"{d.path} (priority {d.priority}, {d.state.value})" for d in pool.datadirs),
        pool.min_free_space,
        "fsync before publishing" if pool.sync else "no fsync (--no-sync)",
    )
    unmount = True
    try:
        trio.run(_serve_until_done, on_ready)
    except BaseException:
        # The session may be in any state: do not risk a second error while
        # unmounting; fusermount3 -u still works.
        unmount = False
        raise
    finally:
        pyfuse3.close(unmount=unmount)
        pool.stop()
        log.info("unmounted %s", mountpoint)


async def _serve_until_done(on_ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        on_ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()


def fork_and_wait_until_ready() -> Callable[[], None]:
    """Fork; the parent exits once the child says it is mounted, or with its error.

    Returns, in the child, the callback that tells the parent the mount is
    ready. Must be called before any thread exists (before trio and pyfuse3
    start).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read(1) == b"1"
        if ready:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code > 0 else 1)
    os.close(read_end)
    os.setsid()
    os.chdir("/")  # hold no directory busy; every path is absolute by now

    def tell_parent_ready() -> None:
        os.write(write_end, b"1")
        os.close(write_end)
        # The parent is gone; its terminal or pipe is no place for our logs.
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    return tell_parent_ready
