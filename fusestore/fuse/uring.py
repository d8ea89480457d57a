"""FUSE over io_uring: one request queue per CPU, answered on that CPU.

Why: on a virtual machine, waking a thread on another CPU costs tens of
microseconds (an inter-processor interrupt to a halted vCPU), and with one
``/dev/fuse`` reader every request and every reply crosses CPUs. With FUSE
over io_uring (Linux 6.14+, ``/sys/module/fuse/parameters/enable_uring``),
the kernel puts a request from a program running on CPU *n* in queue *n*;
fusestore keeps one thread per queue, pinned to that CPU, so the request is
answered where it was made and the program is woken on its own CPU.

The kernel interface (``include/uapi/linux/fuse.h``, ``fs/fuse/dev_uring.c``):
each queue has ring entries; an entry is a header buffer (the request's
``fuse_in_header``, its per-opcode struct, and sizes) and a payload buffer
(names, write data; the reply's data on the way back). An entry is
registered with a ``FUSE_IO_URING_CMD_REGISTER`` command; when a request
lands in it the command completes; the answer goes back with
``FUSE_IO_URING_CMD_COMMIT_AND_FETCH``, which also waits for the next
request. Interrupts, forgets and INIT still travel through ``/dev/fuse``.

The ring itself is driven with the raw system calls (``io_uring_setup``,
``io_uring_enter``) and ``mmap``: Python has no io_uring binding in its
standard library, and the handful of fields needed here do not justify one.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from fusestore.fuse import protocol as p
from fusestore.fuse.rescue import Abandoned, Flight, forget_abandonment

log = logging.getLogger(__name__)

ENABLE_PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")

_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_SETUP_CQSIZE = 1 << 3
_SETUP_SQE128 = 1 << 10
_FEAT_SINGLE_MMAP = 1 << 0
_OFF_SQ_RING = 0
_OFF_CQ_RING = 0x8000000
_OFF_SQES = 0x10000000
_ENTER_GETEVENTS = 1
_OP_URING_CMD = 46
_SQE_SIZE = 128
_CQE = struct.Struct("=QiI")  # user_data, res, flags

# Completions that mean the mount is gone (unmounted, aborted, daemon ending).
_MOUNT_GONE = frozenset({-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ENODEV})
_RETRIES = 3  # of one entry's registration before it is given up

# struct io_uring_params: 7 u32 + resv[3], then io_sqring_offsets and
# io_cqring_offsets (8 u32 and a u64 each).
_PARAMS = struct.Struct("=IIIIIII12xIIIIIIIIQIIIIIIIIQ")
# A whole 128-byte SQE for IORING_OP_URING_CMD: opcode, flags, ioprio, fd,
# cmd_op, pad, addr, len, uring_cmd_flags, user_data, 8 unused bytes, then
# the 80-byte command area holding struct fuse_uring_cmd_req (flags,
# commit_id, qid), zero-padded.
_SQE = struct.Struct("=BBHiIIQIIQ8xQQH62x")

# An entry's memory: the header, then (ending at _PAYLOAD) room to put the
# per-opcode struct right before the payload, so that a handler sees one
# contiguous body exactly as /dev/fuse delivers it.
_PAYLOAD = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_NO_SIZE = ctypes.c_size_t(0)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def switch_on() -> bool:
    """Whether the kernel offers FUSE over io_uring, switching it on if it is off.

    The switch (a parameter of the fuse module, off by default since Linux
    6.14) only lets FUSE servers ask for io_uring at INIT; others are not
    affected. Only root may flip it.
    """
    try:
        if ENABLE_PARAMETER.read_text().strip() in ("Y", "1"):
            return True
    except OSError:
        log.info("io_uring: this kernel has no FUSE over io_uring (Linux 6.14+ has)")
        return False
    try:
        ENABLE_PARAMETER.write_text("1")
    except OSError as exc:
        log.info("io_uring: cannot switch on %s: %s", ENABLE_PARAMETER, exc.strerror)
        return False
    log.info("io_uring: switched on FUSE over io_uring (%s = Y)", ENABLE_PARAMETER)
    return True


def possible_cpus() -> list[int]:
    """The kernel makes one queue per possible CPU, and wants all of them."""
    cpus: list[int] = []
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


# Answers one request: (opcode, unique, nodeid, uid, gid, pid, body, rescue) ->
# (errno or 0, reply), or None for a request without an answer (a forget:
# its entry is committed empty); rescue: what the rescuer calls if it gives
# up on the request.
Answer = Callable[
    [int, int, int, int, int, int, memoryview, Callable[[Flight], None]],
    tuple[int, bytes] | None,
]


class _Ring:
    """One io_uring instance: submission and completion rings, mapped."""

    def __init__(self, entries: int) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        struct.pack_into("=III", params, 0, 0, entries * 2, _SETUP_SQE128 | _SETUP_CQSIZE)
        self.fd = _check(
            _syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), params), "io_uring_setup"
        )
        fields = _PARAMS.unpack(params.raw)
        sq_entries, cq_entries, _, _, _, features = fields[:6]
        sq = fields[7:16]
        cq = fields[16:25]
        sq_size = sq[6] + sq_entries * 4
        cq_size = cq[5] + cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        if features & _FEAT_SINGLE_MMAP:
            self.sq_ring = self.cq_ring = mmap.mmap(
                self.fd, max(sq_size, cq_size), flags, prot, offset=_OFF_SQ_RING
            )
        else:
            self.sq_ring = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
            self.cq_ring = mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
        self.sqes = mmap.mmap(self.fd, sq_entries * _SQE_SIZE, flags, prot, offset=_OFF_SQES)
        # The ring's fields are 32-bit words at the offsets the kernel gave.
        self.sq_words = memoryview(self.sq_ring).cast("I")
        self.cq_words = memoryview(self.cq_ring).cast("I")
        self.sq_tail = sq[1] // 4
        self.sq_mask = self.sq_words[sq[2] // 4]
        self.tail = self.sq_words[self.sq_tail]
        # Slot i of the submission array always names SQE i.
        for index in range(sq_entries):
            self.sq_words[sq[6] // 4 + index] = index
        self.cq_head, self.cq_tail = cq[0] // 4, cq[1] // 4
        self.cq_mask = self.cq_words[cq[2] // 4]
        self.cqes = cq[5]
        self.pending = 0

    def push(self, *sqe: int) -> None:
        """Queue one SQE (the fields of ``_SQE``); :meth:`submit_and_wait` hands it over."""
        _SQE.pack_into(self.sqes, (self.tail & self.sq_mask) * _SQE_SIZE, *sqe)
        self.tail += 1
        # No barrier needed: without SQPOLL the kernel reads the ring only in
        # io_uring_enter, called by this same thread after these stores.
        self.sq_words[self.sq_tail] = self.tail & 0xFFFFFFFF
        self.pending += 1

    def submit_and_wait(self) -> None:
        while True:
            # u32 arguments pass as C ints; the last must be a full size_t.
            result = _syscall(
                _SYS_IO_URING_ENTER, self.fd, self.pending, 1, _ENTER_GETEVENTS, None, _NO_SIZE
            )
            if result >= 0:
                self.pending -= result
                return
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_uring_enter: {os.strerror(code)}")

    def completions(self) -> list[tuple[int, int]]:
        words = self.cq_words
        head = words[self.cq_head]
        tail = words[self.cq_tail]
        done = []
        while head != tail:
            at = self.cqes + (head & self.cq_mask) * _CQE.size
            user_data, result, _ = _CQE.unpack_from(self.cq_ring, at)
            done.append((user_data, result))
            head = (head + 1) & 0xFFFFFFFF
        words[self.cq_head] = head
        return done

    def close(self) -> None:
        self.sq_words.release()
        self.cq_words.release()
        for region in {id(r): r for r in (self.sq_ring, self.cq_ring, self.sqes)}.values():
            region.close()
        os.close(self.fd)


class _Entry:
    """One ring entry's buffers: header and payload, at fixed addresses."""

    def __init__(self, payload_size: int) -> None:
        self.memory = mmap.mmap(-1, _PAYLOAD + payload_size)
        self.view = memoryview(self.memory)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.iovecs = (_Iovec * 2)((base, p.URING_HEADER_SIZE), (base + _PAYLOAD, payload_size))
        self.address = ctypes.addressof(self.iovecs)
        self.payload_size = payload_size


class Queue:
    """The thread that serves one CPU's queue."""

    def __init__(
        self,
        device: int,
        qid: int,
        depth: int,
        payload_size: int,
        answer: Answer,
        on_failure: Callable[[], None],
    ) -> None:
        self.device = device
        self.qid = qid
        self.answer = answer
        # Called if the queue stops while the mount is up: its CPU's requests
        # would wait for ever.
        self.on_failure = on_failure
        self.served = False  # the kernel routes requests here only once every queue is set
        self.entries = [_Entry(payload_size) for _ in range(depth)]
        self._rescues = [functools.partial(self._take_over, index) for index in range(depth)]
        self._completions: collections.deque[tuple[int, int]] = collections.deque()
        self._failures = [0] * depth  # of each entry's registration, in a row
        self._live = depth  # entries the kernel has not refused
        self.ring = _Ring(depth)
        self.thread = self._new_thread(None)

    def _new_thread(self, owed: tuple[int, int, int] | None) -> threading.Thread:
        return threading.Thread(
            target=self._run, args=(owed,), name=f"io_uring queue {self.qid}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def _command(self, index: int, op: int, commit_id: int) -> None:
        entry = self.entries[index]
        address, length = (entry.address, 2) if op == p.URING_CMD_REGISTER else (0, 0)
        # user_data is the entry's index: the completion says which entry got a request.
        head = (_OP_URING_CMD, 0, 0, self.device, op, 0, address, length, 0, index)
        self.ring.push(*head, 0, commit_id, self.qid)

    def _take_over(self, index: int, flight: Flight) -> None:
        """The rescuer (``rescue.py``) gave up on this queue's thread, stuck in
        entry ``index``'s request: a new thread answers that request EIO and
        serves the queue from then on; the stuck one never touches it again."""
        memory = self.entries[index].memory
        _, commit_id, _ = p.URING_ENT.unpack_from(memory, p.URING_ENT_IN_OUT)
        self.thread = self._new_thread((index, flight.unique, commit_id))
        self.thread.start()

    def _run(self, owed: tuple[int, int, int] | None) -> None:
        """Serve the queue; ``owed``: (entry, unique, commit id) of a request
        to answer EIO first, when taking over from a stuck thread."""
        try:
            # On its CPU, the thread is woken where the request was made.
            if self.qid in os.sched_getaffinity(0):
                os.sched_setaffinity(0, {self.qid})
            if owed is None:
                for index in range(len(self.entries)):
                    self._command(index, p.URING_CMD_REGISTER, 0)
            else:
                index, unique, commit_id = owed
                self._commit(index, unique, commit_id, errno.EIO, b"")
            if self._serve_until_gone():
                self.ring.close()
                return
            log.error("io_uring queue %d has no entries left", self.qid)
        except Abandoned:
            forget_abandonment()
            # Another thread serves the queue now: leave the ring to it. And
            # do not end: the kernel cancels the ring commands a thread
            # submitted when it ends, which would cancel requests that the
            # entries this thread registered hold now (programs would get
            # ECANCELED). A parked thread costs a stack.
            threading.Event().wait()
        except Exception:
            log.exception("io_uring queue %d failed", self.qid)
        self.ring.close()
        self.on_failure()

    def _serve_until_gone(self) -> bool:
        """Serve completions until the mount is gone (True) or no entry is left.

        Completions wait in ``self._completions``, not in a local list: a
        thread taking over from a stuck one (``_take_over``) answers those
        the stuck one had taken from the ring but not served.
        """
        pending = self._completions
        while self._live:
            if not pending:
                self.ring.submit_and_wait()
                pending.extend(self.ring.completions())
                continue
            index, result = pending.popleft()
            if result == 0:
                self._failures[index] = 0
                self.served = True
                self._serve(index)
            elif result in _MOUNT_GONE:
                log.debug("io_uring queue %d: the mount is gone", self.qid)
                return True
            elif result in (-errno.EINTR, -errno.EAGAIN) or self._failures[index] < _RETRIES:
                # A commit the kernel could not match (its request
                # ended meanwhile) loses the entry: register it anew.
                self._failures[index] += 1
                if result not in (-errno.EINTR, -errno.EAGAIN):
                    log.warning(
                        "io_uring queue %d: entry %d: %s; registering it again",
                        self.qid,
                        index,
                        os.strerror(-result),
                    )
                self._command(index, p.URING_CMD_REGISTER, 0)
            else:
                self._live -= 1
                log.error(
                    "io_uring queue %d: the kernel refuses entry %d: %s",
                    self.qid,
                    index,
                    os.strerror(-result),
                )
        return False

    def _serve(self, index: int) -> None:
        entry = self.entries[index]
        memory = entry.memory
        length, opcode, unique, nodeid, uid, gid, pid, *_ = p.IN_HEADER.unpack_from(memory, 0)
        _, commit_id, payload_size = p.URING_ENT.unpack_from(memory, p.URING_ENT_IN_OUT)
        op_size = length - p.IN_HEADER.size - payload_size
        op_room = p.URING_ENT_IN_OUT - p.URING_OP_IN
        if 0 <= op_size <= op_room and payload_size <= entry.payload_size:
            start = _PAYLOAD - op_size
            memory[start:_PAYLOAD] = memory[p.URING_OP_IN : p.URING_OP_IN + op_size]
            body = entry.view[start : _PAYLOAD + payload_size]
            try:
                outcome = self.answer(
                    opcode, unique, nodeid, uid, gid, pid, body, self._rescues[index]
                )
                code, reply = outcome or (0, b"")
            except Exception:  # the entry must be committed whatever happened
                log.exception("io_uring queue %d: request %d failed", self.qid, unique)
                code, reply = errno.EIO, b""
        else:
            log.error("io_uring: request %d has impossible sizes", unique)
            code, reply = errno.EIO, b""
        self._commit(index, unique, commit_id, code, reply)

    def _commit(self, index: int, unique: int, commit_id: int, code: int, reply: bytes) -> None:
        """Put the answer in the entry and queue its commit (sent with the next wait)."""
        entry = self.entries[index]
        memory = entry.memory
        size = len(reply)
        if size > entry.payload_size:
            log.error("io_uring: a reply of %d bytes does not fit its entry", size)
            code, reply, size = errno.EIO, b"", 0
        if size:
            memory[_PAYLOAD : _PAYLOAD + size] = reply
        p.OUT_HEADER.pack_into(memory, 0, p.OUT_HEADER.size + size, -code, unique)
        p.URING_PAYLOAD_SIZE.pack_into(memory, p.URING_PAYLOAD_SIZE_AT, size)
        self._command(index, p.URING_CMD_COMMIT_AND_FETCH, commit_id)
