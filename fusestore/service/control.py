"""The daemon's control socket: ``fusestore status``, ``drain`` and ``balance``.

One request per connection, as its first line: ``status`` (the daemon's view
as one JSON document, ``fusestore/admin/status.py``), or a JSON object asking
for a job (``{"command": "drain", ...}``), answered with one JSON event per
line for as long as the job runs (``fusestore/service/jobs.py``).

Who may ask: ``status`` anyone who can reach the socket (mode 0666) — it
tells what ``df`` and ``ls`` of the datadirs would. A job changes the pool,
so only root or the daemon's own user may ask for one: the kernel tells the
peer's uid (``SO_PEERCRED``), which a client cannot forge.

Sockets of daemons that died without removing theirs (``kill -9``) are
removed when any daemon starts (:func:`remove_dead_sockets`): nothing
answers on them any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from typing import Any

import trio

from fusestore.admin import status
from fusestore.fuse.requestloop import RequestLoop
from fusestore.pool.pool import Pool
from fusestore.service.jobs import Job, JobRefused, Jobs

log = logging.getLogger(__name__)

_MAX_REQUEST = 64 * 1024
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def remove_dead_sockets(directory: str) -> None:
    """Unlink the sockets in ``directory`` that nobody listens on any more."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    removed = 0
    for name in names:
        if not name.endswith(".sock"):
            continue
        path = os.path.join(directory, name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue  # someone's; leave it
    if removed:
        log.info("cleaned up %d socket(s) left by dead daemons in %s", removed, directory)


def peer_uid(stream: trio.SocketStream) -> int:
    """The uid of the process at the other end, as the kernel knows it."""
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[1])


async def serve_control(
    server: socket.socket,
    pool: Pool,
    facts: dict[str, Any],
    loop: RequestLoop,
    jobs: Jobs,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the control socket until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(server))

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await _answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command went away
            except Exception:
                # A bug in one request must not end the daemon's control socket.
                log.exception("a control request failed")

    async def _answer(stream: trio.SocketStream) -> None:
        line = await _first_line(stream)
        if not line.strip():
            # Nothing asked: a connection closed unused, as every starting
            # daemon's remove_dead_sockets probes the others'. Answering it
            # with a status would stat every file of the pool (a million
            # files: seconds, and hundreds of MiB while it runs) for nobody.
            return
        if line.strip() == b"status":
            # In a thread: counting the files of a large pool reads every
            # datadir, and requests must not wait for it.
            now = {**facts, "io_uring_queues": loop.io_uring_queues}
            if jobs.current is not None:
                now["job"] = jobs.current.progress()
            report = await trio.to_thread.run_sync(status.encode, pool, now)
            await stream.send_all(report)
            return
        await _run_job(stream, line, pool, loop, jobs)

    await trio.serve_listeners(answer, [listener], task_status=task_status)


async def _first_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < _MAX_REQUEST:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0]


async def _cancel_when_gone(stream: trio.SocketStream, job: Job, scope: trio.CancelScope) -> None:
    """A command that is stopped (Ctrl-C, kill) closes its end: the job stops
    at once, abandoning the file it copies, instead of at its next event."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(4096):
            pass
    job.cancel()
    scope.cancel()


async def _send(stream: trio.SocketStream, event: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(event).encode() + b"\n")


async def _run_job(
    stream: trio.SocketStream, line: bytes, pool: Pool, loop: RequestLoop, jobs: Jobs
) -> None:
    uid = peer_uid(stream)
    if uid not in (0, os.geteuid()):
        log.warning("refused a request from uid %d: only root or uid %d", uid, os.geteuid())
        await _send(
            stream,
            {
                "event": "refused",
                "message": f"permission denied: only root or the daemon's user (uid "
                f"{os.geteuid()}) may change the pool; you are uid {uid}",
            },
        )
        return
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        await _send(stream, {"event": "refused", "message": f"bad request: {exc}"})
        return
    job = Job(pool, loop.lock, request)
    try:
        jobs.start(job)
    except JobRefused as exc:
        await _send(stream, {"event": "refused", "message": str(exc)})
        return
    try:
        try:
            await trio.to_thread.run_sync(job.make_plan)
        except JobRefused as exc:
            await _send(stream, {"event": "refused", "message": str(exc)})
            return
        worker = threading.Thread(target=job.run, name=f"{job.command} job", daemon=True)
        worker.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_gone, stream, job, nursery.cancel_scope)
                while (
                    event := await trio.to_thread.run_sync(job.events.get, abandon_on_cancel=True)
                ) is not None:
                    await _send(stream, event)
                nursery.cancel_scope.cancel()
        finally:
            job.cancel()  # the command went away (or we are unmounting)
            with trio.CancelScope(shield=True):  # the pool must not stop under it
                await trio.to_thread.run_sync(worker.join)
    finally:
        jobs.finished(job)
