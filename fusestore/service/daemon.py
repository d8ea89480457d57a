"""Run the FUSE session: mount, serve requests, unmount on signal or umount.

Also owns going to the background the way mount helpers are expected to: the
command that starts the daemon returns only once the mount answers, and
returns the daemon's error and exit status if mounting failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pyfuse3
import sdnotify
import trio

from fusestore.admin import status
from fusestore.fuse import transport as transports
from fusestore.fuse.handlers import Operations
from fusestore.fuse.requestloop import RequestLoop, fuse_device_fd
from fusestore.pool.config import escape_list_item
from fusestore.pool.pool import Pool
from fusestore.service import control
from fusestore.service.jobs import Jobs

log = logging.getLogger(__name__)

MOUNT_OPTIONS = frozenset({"subtype=fusestore", "default_permissions"})


def libfuse_options(options: Iterable[str], fsname: str) -> set[str]:
    """``options`` as libfuse's option parser reads them, with ``fsname=`` added
    unless there is one.

    libfuse splits each option at commas unless escaped with a backslash, as
    datadir lists are (:func:`~fusestore.pool.config.escape_list_item`);
    pyfuse3 passes options as ASCII, so anything else in the fsname becomes ``?``.
    """
    chosen = set(options)
    if not any(option.startswith("fsname=") for option in chosen):
        printable = "".join(c if c.isascii() and c.isprintable() else "?" for c in fsname)
        chosen.add(f"fsname={printable}")
    return {escape_list_item(option) for option in chosen}


class MountError(RuntimeError):
    """The kernel or libfuse refused the mount."""


def serve(
    pool: Pool,
    mountpoint: str,
    fuse_options: Iterable[str] = (),
    debug: bool = False,
    busy_poll_us: int = 0,
    on_ready: Callable[[], None] = lambda: None,
    reload: Callable[[], None] | None = None,
    about: dict[str, Any] | None = None,
    transport: str = "auto",
    fsname: str = "fusestore",
) -> None:
    """Mount the pool and serve it until unmounted or signalled (SIGTERM, SIGINT).

    ``on_ready`` runs, and systemd hears READY=1, once the mount has answered
    a request. SIGHUP calls ``reload``. ``transport`` (auto, io_uring, devfuse)
    says how requests reach the daemon (``fusestore/fuse/transport.py``); with
    auto, both are timed on a probe mount first. ``fsname`` is
    the source ``mount`` shows, unless ``fuse_options`` has an ``fsname=``.
    """
    pool.start()
    # Before mounting: a mount cannot leave the io_uring queues once registered.
    choice = transports.choose(transport, busy_poll_us, pool.root_stat)
    facts = {
        "mountpoint": mountpoint,
        "pid": os.getpid(),
        "transport": choice.facts(),
        **(about or {}),
    }
    # Before mounting: resolving the mountpoint's path afterwards would ask
    # this very daemon, which is not serving requests yet.
    for directory in {os.path.dirname(path) for path in status.socket_paths(mountpoint)}:
        control.remove_dead_sockets(directory)
    server, server_path = status.listen(mountpoint)
    options = libfuse_options([*MOUNT_OPTIONS, *fuse_options], fsname)
    try:
        # pyfuse3 (libfuse) only mounts: fusestore answers the requests itself
        # (fusestore/fuse/requestloop.py), so pyfuse3 never calls these operations.
        pyfuse3.init(pyfuse3.Operations(), mountpoint, options)
    except RuntimeError as exc:
        pool.stop()
        _close_status(server, server_path)
        raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
    device = fuse_device_fd()
    if device is None:
        pyfuse3.close(unmount=True)
        pool.stop()
        _close_status(server, server_path)
        raise MountError(f"cannot mount {mountpoint}: no single /dev/fuse descriptor found")
    loop = RequestLoop(Operations(pool), device, busy_poll_us, debug, choice.io_uring)
    log.info(
        "mounted %s with datadirs %s, min_free_space %d bytes, %s, checksums %s, busy_poll %d µs, "
        "datadir_timeout %g s",
        mountpoint,
        ", ".join(f"{d.path} (priority {d.priority}, {d.state.value})" for d in pool.datadirs),
        pool.min_free_space,
        "fsync before publishing" if pool.sync else "no fsync (--no-sync)",
        "+".join(pool.algorithms) or "none",
        busy_poll_us,
        pool.health.timeout,
    )
    unmount = True
    try:
        answered = trio.run(
            _serve_until_done, pool, server, mountpoint, loop, on_ready, reload, facts
        )
    except BaseException:
        # The session may be in any state: do not risk a second error while
        # unmounting; fusermount3 -u still works.
        unmount = False
        raise
    finally:
        pyfuse3.close(unmount=unmount)
        loop.close()
        _close_status(server, server_path)
        pool.stop()
        log.info("unmounted %s", mountpoint)
    if not answered:
        raise MountError(f"{mountpoint} was mounted but did not answer: unmounted again")


def _close_status(server: socket.socket, path: str) -> None:
    server.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


async def _serve_until_done(
    pool: Pool,
    server: socket.socket,
    mountpoint: str,
    loop: RequestLoop,
    on_ready: Callable[[], None],
    reload: Callable[[], None] | None,
    facts: dict[str, Any],
) -> bool:
    """Serve until unmounted or stopped; False if the mount never answered."""
    notifier = sdnotify.SystemdNotifier()
    answered = True
    jobs = Jobs()  # drain and balance (fusestore/service/jobs.py)

    async def announce() -> None:
        nonlocal answered
        answered = await _announce_when_usable(mountpoint, notifier, on_ready)
        if not answered:
            loop.stop()  # the mount is of no use; the command must fail

    async with trio.open_nursery() as nursery:
        # Started, not just scheduled: a signal must find its receiver in
        # place from the first request.
        await nursery.start(_handle_signals, notifier, loop, reload)
        await nursery.start(control.serve_control, server, pool, facts, loop, jobs)
        nursery.start_soon(announce)
        # Requests are answered in a thread of their own: they never wait for
        # trio, and trio (signals, status) never waits for them.
        await trio.to_thread.run_sync(loop.run)
        # Also when unmounted from outside, not only on a signal.
        notifier.notify("STOPPING=1")
        jobs.cancel_all()  # each stops after its file; the pool stops after them
        nursery.cancel_scope.cancel()
    return answered


async def _announce_when_usable(
    mountpoint: str, notifier: sdnotify.SystemdNotifier, on_ready: Callable[[], None]
) -> bool:
    """Tell the parent (or systemd) the mount is usable, once it has answered a
    request; whether it did (if not, neither hears that it is ready)."""
    # Our own main loop must answer this stat: only then is the mount usable.
    # Another process asks, not a thread of ours: a thread waiting on our own
    # mount when the daemon is killed (-9) keeps the process, and so
    # /dev/fuse, alive for ever, and the mount hangs instead of failing.
    asked = await trio.run_process(
        [sys.executable, "-I", "-S", "-c", "import os, sys; os.stat(sys.argv[1])", mountpoint],
        stdout=subprocess.DEVNULL,
        check=False,
    )
    if asked.returncode != 0:
        log.error("%s does not answer a stat (exit %d)", mountpoint, asked.returncode)
        return False
    on_ready()
    notifier.notify(f"READY=1\nSTATUS=serving {mountpoint}")
    log.info("ready: %s answers", mountpoint)
    return True


async def _handle_signals(
    notifier: sdnotify.SystemdNotifier,
    loop: RequestLoop,
    reload: Callable[[], None] | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                notifier.notify("RELOADING=1")
                if reload is None:
                    log.warning("received SIGHUP: no config file to reload")
                else:
                    log.info("received SIGHUP: reloading the config")
                    with loop.lock.exclusive():  # between two requests
                        reload()
                notifier.notify("READY=1")
                continue
            log.info("received %s: unmounting", signal.Signals(signum).name)
            notifier.notify("STOPPING=1")
            loop.stop()


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
