"""Give up on requests stuck in a hung datadir, so that the mount goes on.

Why: a request that asked a datadir just before its filesystem stopped
answering waits in the kernel, in a thread of ours, for as long as that
filesystem is silent: minutes, or for ever. That thread is the one that
reads the next request (``/dev/fuse``) or serves its CPU's queue
(io_uring), and it holds the pool's request lock, so the whole mount would
wait with it. Such a thread cannot be woken. Instead, once the pool knows a
datadir is hung (``fusestore/pool/health.py``), every request that has run
longer than ``datadir_timeout`` is *abandoned*:

1. its hold on the request lock is dropped (``RequestLock.forsake``);
2. its transport answers it ``EIO`` and starts a new thread to take over
   reading requests (``RequestLoop``) or serving the queue (``uring.Queue``);
3. the stuck thread gets an :class:`Abandoned` exception, raised by the
   interpreter when its system call returns, if it ever does: it unwinds
   without answering anything and ends.

Every request records when it started (:meth:`Rescuer.begin`) and takes its
record back when its handler is done (:meth:`Rescuer.end`), both under one
mutex with the rescuer, so a request is either finished by its own thread or
abandoned, never both. Only requests in handlers are watched: a thread
waiting for the next request is not stuck.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fusestore.fuse import protocol as p
from fusestore.fuse.requestlock import RequestLock

log = logging.getLogger(__name__)

# Seconds between two looks for stuck requests.
_CHECK_INTERVAL = 0.25

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class Abandoned(BaseException):
    """Raised in a request thread that was given up on: it must answer nothing.

    A BaseException, so that the handlers' ``except Exception`` and ``except
    OSError`` let it through to the thread's top, which ends quietly.
    """


def forget_abandonment() -> None:
    """In an abandoned thread about to end: drop an :class:`Abandoned` still pending."""
    _set_async_exc(threading.get_ident(), ctypes.py_object())


@dataclass(slots=True)
class Flight:
    """A request being answered: what it is, since when, and how to give up on it."""

    unique: int
    opcode: int
    started: float
    # Called by the rescuer: answer EIO and hand the thread's work to a new one.
    rescue: Callable[[Flight], None]


class Rescuer:
    """The thread that abandons requests stuck in a hung datadir."""

    def __init__(
        self, lock: RequestLock, timeout: Callable[[], float], any_hung: Callable[[], bool]
    ) -> None:
        self._lock = lock
        self._timeout = timeout
        self._any_hung = any_hung
        self._flights: dict[int, Flight] = {}
        self._mutex = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rescuer", daemon=True)
        self.abandoned_count = 0  # for status and tests: threads left behind

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def begin(self, unique: int, opcode: int, rescue: Callable[[Flight], None]) -> None:
        """This thread starts answering a request."""
        self._flights[threading.get_ident()] = Flight(unique, opcode, time.monotonic(), rescue)

    def end(self) -> None:
        """This thread is done with its request: Abandoned if the rescuer gave up on it."""
        ident = threading.get_ident()
        with self._mutex:
            if self._flights.pop(ident, None) is None:
                raise Abandoned

    def _run(self) -> None:
        while not self._stopping.wait(_CHECK_INTERVAL):
            if self._flights and self._any_hung():
                try:
                    self.check()
                except Exception:
                    log.exception("cannot rescue the requests stuck in a hung datadir")

    def check(self) -> None:
        """Abandon every request that has run longer than the timeout."""
        limit = time.monotonic() - self._timeout()
        for ident, flight in list(self._flights.items()):
            if flight.started > limit:
                continue
            with self._mutex:
                if self._flights.get(ident) is not flight:
                    continue  # it finished meanwhile
                del self._flights[ident]
                self._lock.forsake(ident)
                self.abandoned_count += 1
            log.error(
                "%s request #%d has waited %.0f s, most likely in a hung datadir: "
                "answered EIO; its thread is left behind until the datadir answers",
                p.OPCODE_NAMES.get(flight.opcode, flight.opcode),
                flight.unique,
                time.monotonic() - flight.started,
            )
            flight.rescue(flight)
            _set_async_exc(ident, ctypes.py_object(Abandoned))
