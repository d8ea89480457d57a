"""Read the kernel's requests from ``/dev/fuse``, answer them, one at a time.

pyfuse3 (through libfuse) mounts the pool; fusestore then speaks the kernel's
FUSE protocol on the mount's ``/dev/fuse`` descriptor itself, in one thread
of its own. Measured on the project's machine, pyfuse3's loop cost about
10 µs of CPU per request (a trio task switch, a coroutine and several objects
per request, a ``bytes`` copy of every write) against 2-4 µs for this loop;
and libfuse 3.14 (Debian 12) cannot ask the kernel for FUSE passthrough or
plain READDIR, pyfuse3 offers neither. See docs/design.md.

The loop:

* negotiates the protocol (INIT): 1 MiB writes, no READDIRPLUS (a listing
  sends names only; ``ls -l`` looks each one up), and FUSE passthrough when
  the kernel offers it and the daemon runs as root (see ``handlers.py``);
* reads the next request without blocking; when none is there it keeps
  trying for ``busy_poll`` microseconds — a request that follows within that
  time (the next write of a ``cp``) is answered without the daemon going to
  sleep and being woken — and then sleeps in ``poll(2)`` until a request
  comes or :meth:`RequestLoop.stop` is called;
* runs each handler in an exclusive section of ``lock`` (``requestlock.py``),
  so that a config reload from another thread never sees a request half
  done; only the ``pwrite`` of WRITE requests may overlap each other;
* with FUSE over io_uring (``uring.py``), starts one queue thread per CPU
  right after INIT; the kernel then sends every request but forgets and
  interrupts to the queues, and this loop stops spinning: it takes forgets in
  batches, at most every ``_FORGET_BATCH_MS``, so that a program whose unlink
  causes a forget does not have to wake this thread on another CPU for it.

Requests are read by a thread of the loop's own, not by the caller of
:meth:`RequestLoop.run`: a request stuck in a hung datadir can take that
thread with it, and the rescuer (``rescue.py``) then starts another.

It ends when the mount goes away (``umount``: the device answers ENODEV) or
when :meth:`RequestLoop.stop` is called (a signal).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from fusestore.fuse import protocol as p
from fusestore.fuse import uring
from fusestore.fuse.handlers import Operations
from fusestore.fuse.requestlock import RequestLock
from fusestore.fuse.rescue import Abandoned, Flight, Rescuer, forget_abandonment

log = logging.getLogger(__name__)

MAX_WRITE = 1024 * 1024
# The kernel refuses reads into a buffer that cannot take the largest write.
_BUFFER_SIZE = MAX_WRITE + 64 * 1024
_MAX_BACKGROUND = 64
_FORGET_BATCH_MS = 20
# Ring entries per CPU: requests a CPU's programs can have in flight at once
# (each entry holds a 1 MiB buffer, touched only when used). One: the queue's
# thread answers one request at a time anyway, and the kernel delivers a
# request to the thread that armed its entry (task work), so entries armed by
# a thread stuck in a hung datadir would keep their next requests from the
# thread that takes over (rescue.py) until the datadir answers.
_QUEUE_DEPTH = 1
# Requests that get no answer.
_NO_REPLY = frozenset({p.FORGET, p.BATCH_FORGET, p.INTERRUPT})
# What the kernel still sends through /dev/fuse once the io_uring queues run.
_NOT_FOR_QUEUES = frozenset({p.FORGET, p.BATCH_FORGET, p.INTERRUPT})
# Expected errors that need no log line of their own.
# (ENODATA: an extended attribute a file does not have; ls -l asks for some.)
_QUIET_ERRNOS = frozenset(
    {errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.ENODATA, errno.ENXIO}
)
# Seconds run() waits, after stop(), for the request being answered: one
# stuck in a hung datadir must not keep the daemon from ending.
_STOP_GRACE = 2.0


def fuse_device_fd() -> int | None:
    """The descriptor of ``/dev/fuse`` that ``pyfuse3.init`` opened, if exactly one."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "/dev/fuse":
                found.append(int(entry))
        except OSError:
            continue  # the listing's own descriptor, already closed
    return found[0] if len(found) == 1 else None


class RequestLoop:
    """Serve one mount's ``/dev/fuse`` until unmounted or stopped."""

    def __init__(
        self,
        operations: Operations,
        device: int,
        busy_poll_us: int = 0,
        debug: bool = False,
        io_uring: bool = False,
    ) -> None:
        self.operations = operations
        self.device = device
        operations.device = device
        # Requests take it exclusively (writes may overlap); so does a reload.
        self.lock = RequestLock()
        operations.outside_lock = self.lock.released
        health = operations.pool.health
        self.rescuer = Rescuer(self.lock, lambda: health.timeout, health.any_hung)
        self._ended = threading.Event()
        self._failure: BaseException | None = None
        self.busy_poll_seconds = busy_poll_us / 1e6
        self.debug = debug
        self._stopping = False
        # Asked for io_uring; after INIT: whether the kernel agreed.
        self.io_uring = io_uring
        self.queues: list[uring.Queue] = []
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def io_uring_queues(self) -> int:
        """Queues serving requests (0: /dev/fuse), as ``fusestore status`` shows."""
        alive = all(queue.thread.is_alive() for queue in self.queues)
        return len(self.queues) if alive else 0

    def stop(self) -> None:
        """Make :meth:`run` return after the request it is answering, if any
        (or at most ``_STOP_GRACE`` seconds later)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):  # already woken
            os.write(self._wake_write, b"x")

    def close(self) -> None:
        os.close(self._wake_read)
        os.close(self._wake_write)

    def run(self) -> None:
        """Answer requests until the mount goes away or :meth:`stop` is called."""
        self.rescuer.start()
        self._start_reader()
        stopped_at = None
        while not self._ended.wait(0.25):
            if self._stopping:
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > _STOP_GRACE:
                    log.warning("ending while a request is still stuck (in a hung datadir?)")
                    break
        self.rescuer.stop()
        if self._failure is not None:
            raise self._failure

    def _start_reader(self) -> None:
        threading.Thread(target=self._reader, name="/dev/fuse", daemon=True).start()

    def _reader(self) -> None:
        try:
            self._read_device()
        except Abandoned:
            forget_abandonment()
            return  # the rescuer started another reader
        except BaseException as exc:
            self._failure = exc
        self._ended.set()

    def _rescue_reader(self, flight: Flight) -> None:
        """The rescuer gave up on the reader's request: answer it, read on in a new thread."""
        if flight.opcode not in _NO_REPLY:
            with contextlib.suppress(OSError):
                self._reply_error(flight.unique, errno.EIO)
        self._start_reader()

    def _read_device(self) -> None:
        os.set_blocking(self.device, False)
        buffer = bytearray(_BUFFER_SIZE)
        view = memoryview(buffer)
        poller = select.poll()
        poller.register(self.device, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        idle_since = 0.0
        only_forgets = False  # the queues answer everything else
        while not self._stopping:
            try:
                length = os.readv(self.device, [buffer])
            except BlockingIOError:
                now = time.perf_counter()
                if not idle_since:
                    idle_since = now
                if only_forgets:
                    # Let more forgets gather, without anyone having to wake
                    # us for each; then take them all and, once none come,
                    # wait on the device again.
                    poller.unregister(self.device)
                    poller.poll(_FORGET_BATCH_MS)
                    poller.register(self.device, select.POLLIN)
                    only_forgets = False
                    continue
                if now - idle_since >= self.busy_poll_seconds:
                    poller.poll()
                    idle_since = 0.0
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # interrupted before we read it
                if exc.errno == errno.ENODEV:
                    log.debug("the kernel closed the connection (unmounted)")
                    return
                raise
            idle_since = 0.0
            opcode = self._answer(view[:length])
            # Only once the kernel really uses the queues: if they could not
            # be set up, requests keep coming this way and must not wait.
            only_forgets = opcode in _NOT_FOR_QUEUES and any(q.served for q in self.queues)

    def _answer(self, request: memoryview) -> int:
        """Answer one request read from /dev/fuse; its opcode."""
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = p.IN_HEADER.unpack_from(request)
        body = request[p.IN_HEADER.size :]
        if opcode == p.INIT:
            self._reply(unique, self._negotiate(body))
            self._start_queues()
        elif opcode == p.DESTROY:
            self._reply(unique, b"")
        elif opcode != p.INTERRUPT:  # interrupts need no answer: requests finish fast
            outcome = self.respond(opcode, unique, nodeid, uid, gid, pid, body, self._rescue_reader)
            if outcome is not None:  # None: a forget, which has no answer
                code, payload = outcome
                if code:
                    self._reply_error(unique, code)
                else:
                    self._reply(unique, payload)
        return opcode

    def respond(
        self,
        opcode: int,
        unique: int,
        nodeid: int,
        uid: int,
        gid: int,
        pid: int,
        body: memoryview,
        rescue: Callable[[Flight], None],
    ) -> tuple[int, bytes] | None:
        """Run the handler of one request: (errno or 0, reply payload), None for no reply.

        ``rescue``: how the transport answers and replaces this thread if the
        rescuer gives up on the request (``rescue.py``); the handler runs
        between ``rescuer.begin`` and ``rescuer.end``, inside its lock.
        """
        rescuer = self.rescuer
        handler = self.operations.handlers.get(opcode)
        if self.debug:
            name = p.OPCODE_NAMES.get(opcode, opcode)
            via = threading.current_thread().name  # /dev/fuse or the CPU's queue
            log.debug("%s(inode=%d, %d bytes) #%d via %s", name, nodeid, len(body), unique, via)
        if handler is None:
            return errno.ENOSYS, b""
        try:
            payload = None
            if opcode == p.WRITE:
                # Beside other writes; any failure is done again exclusively.
                with contextlib.suppress(OSError):
                    rescuer.begin(unique, opcode, rescue)
                    try:
                        payload = self.lock.overlapping(
                            lambda: self.operations.start_write(nodeid, body)
                        )
                    finally:
                        rescuer.end()
            if payload is None:
                with self.lock.exclusive():
                    rescuer.begin(unique, opcode, rescue)
                    try:
                        self.operations.caller_pid = pid  # the handlers run one at a time
                        payload = handler(nodeid, uid, gid, body)
                    finally:
                        rescuer.end()
        except OSError as exc:
            code = exc.errno or errno.EIO
            # already_logged: the pool logged its cause once (a hung datadir).
            quiet = code in _QUIET_ERRNOS or getattr(exc, "already_logged", False)
            if self.debug or not quiet:
                level = logging.DEBUG if self.debug else logging.INFO
                log.log(level, "%s: %s", p.OPCODE_NAMES[opcode], exc)
            return code, b""
        except Exception:
            log.exception("%s on inode %d failed unexpectedly", p.OPCODE_NAMES[opcode], nodeid)
            return errno.EIO, b""
        return None if payload is None else (0, payload)

    def _start_queues(self) -> None:
        """After INIT: one queue per CPU; the kernel uses them once all are in place."""
        if not self.io_uring:
            return
        try:
            self.queues = [
                uring.Queue(
                    self.device,
                    cpu,
                    _QUEUE_DEPTH,
                    MAX_WRITE,
                    self.respond,
                    self._queue_failed,
                )
                for cpu in uring.possible_cpus()
            ]
        except OSError as exc:
            log.error("cannot set up io_uring, requests stay on /dev/fuse: %s", exc)
            self.queues = []
            return
        for queue in self.queues:
            queue.start()
        # Spinning here now would only hold the interpreter lock that the
        # queues need.
        self.busy_poll_seconds = 0
        log.info(
            "io_uring: %d queues, one per CPU, of %d ring entr%s each",
            len(self.queues),
            _QUEUE_DEPTH,
            "y" if _QUEUE_DEPTH == 1 else "ies",
        )

    def _queue_failed(self) -> None:
        """A queue stopped while mounted.

        If the kernel was already sending requests to the queues, that CPU's
        requests would never be answered: ending the daemon ends the mount's
        connection, so programs get an error at once instead of waiting for
        ever. If not (the kernel refused the queue's entries from the
        start), it never will: requests stay on /dev/fuse.
        """
        if self._stopping:
            return
        if any(queue.served for queue in self.queues):
            log.critical("an io_uring queue stopped: unmounting rather than leave requests hanging")
            self.stop()
        else:
            log.error("io_uring could not be set up: requests stay on /dev/fuse")

    def _negotiate(self, body: memoryview) -> bytes:
        major, minor, max_readahead, flags, flags2 = p.INIT_IN.unpack_from(body)
        if major != p.KERNEL_MAJOR:
            raise RuntimeError(f"unsupported FUSE protocol {major}.{minor}")
        offered = flags | (flags2 << 32 if flags & p.INIT_EXT else 0)
        # Not ATOMIC_O_TRUNC: with it the kernel would leave a truncating
        # open() to us without saying whether the caller may keep setuid
        # bits; without it, it sends the truncation as a SETATTR that also
        # clears them, as it does for truncate() and chown().
        wanted = (
            p.ASYNC_READ
            | p.BIG_WRITES
            | p.AUTO_INVAL_DATA
            | p.ASYNC_DIO
            | p.PARALLEL_DIROPS
            | p.MAX_PAGES
            | p.INIT_EXT
            | p.DIRECT_IO_ALLOW_MMAP
            # We clear setuid/setgid on write, truncate and chown (WRITE_
            # KILL_SUIDGID, FATTR_KILL_SUIDGID): the kernel then marks files
            # it has checked as needing no check (SB_NOSEC), instead of
            # asking for security.capability before every passthrough write.
            | p.HANDLE_KILLPRIV_V2
        )
        if os.geteuid() == 0:  # the kernel lets only root register backing files
            wanted |= p.PASSTHROUGH
        if self.io_uring:
            wanted |= p.OVER_IO_URING
        agreed = wanted & offered
        self.io_uring = bool(agreed & p.OVER_IO_URING)
        passthrough = bool(agreed & p.PASSTHROUGH)
        if passthrough:
            self.operations.passthrough = True
        if self.io_uring:
            transport = "io_uring: requests answered on the CPU that made them"
        elif wanted & p.OVER_IO_URING:
            transport = "/dev/fuse (the kernel does not offer io_uring)"
        else:
            transport = "/dev/fuse"
        log.info(
            "kernel FUSE protocol %d.%d; passthrough %s; requests through %s",
            major,
            minor,
            "on: reads of files nobody writes go straight to the disk" if passthrough else "off",
            transport,
        )
        return p.INIT_OUT.pack(
            p.KERNEL_MAJOR,
            minor,
            max_readahead,
            agreed & 0xFFFFFFFF,
            _MAX_BACKGROUND,
            _MAX_BACKGROUND * 3 // 4,
            MAX_WRITE,
            1,  # time granularity: nanoseconds
            MAX_WRITE // os.sysconf("SC_PAGE_SIZE"),
            0,
            agreed >> 32,
            1 if passthrough else 0,  # datadirs are on plain filesystems
        )

    def _reply(self, unique: int, payload: bytes) -> None:
        header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(payload), 0, unique)
        self._send([header, payload] if payload else [header])

    def _reply_error(self, unique: int, code: int) -> None:
        self._send([p.OUT_HEADER.pack(p.OUT_HEADER.size, -code, unique)])

    def _send(self, parts: list[bytes]) -> None:
        try:
            os.writev(self.device, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise
