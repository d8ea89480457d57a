"""Whether a file is still open elsewhere when one of its descriptors closes.

A new file is published at the FLUSH of a close(2), so that close() can
report a taken name or a failed write and the name is there when it
returns. But FUSE sends FLUSH at *every* close of a descriptor, and the
kernel does not say whether other descriptors of the same open file remain:
shells open a file, ``dup2`` it onto stdout and close the original before
writing a byte; a forked child closes its inherited copy. While the writes
come to the pool, a file published by such an early close is hidden again at
its next write (``publish.take_back``). Writes the kernel makes through FUSE
passthrough never come, so for such a file the FLUSH itself must find out:
the descriptor tables of the closing process and of the file's creator and
their descendants (which inherit descriptors across fork) are searched in
``/proc`` for a descriptor on the file's path. ``readlink`` of
``/proc/PID/fd/N`` names the path without a FUSE request, unlike ``stat``.

What this cannot see: a descriptor passed over a Unix socket to an
unrelated process, or held by an orphan whose parent ended (it is then
nobody's descendant). Such a file is published at the creator's last close
and written on under its name (README *Writes straight to the disk*).
"""

from __future__ import annotations

import os

# A bound on the processes searched: a creator with a huge family (a
# long-lived shell that started thousands) must not make close() slow.
MAX_PROCESSES = 256


def still_open(path: str, closing_pid: int, creator_pid: int) -> bool:
    """Whether a process of the creator's or the closer's family has a descriptor on ``path``.

    ``closing_pid`` is the thread whose close(2) this is (its descriptor is
    already out of its table); ``creator_pid`` the thread that created the
    file. Either may be 0 (unknown, as for a process in a pid namespace the
    daemon cannot see): it is then not searched.
    """
    todo = [pid for pid in (closing_pid, creator_pid) if pid > 0]
    seen: set[int] = set()
    while todo and len(seen) < MAX_PROCESSES:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if _has_descriptor_on(pid, path):
            return True
        todo.extend(_children(pid))
    return False


def _has_descriptor_on(pid: int, path: str) -> bool:
    directory = f"/proc/{pid}/fd"
    try:
        descriptors = os.listdir(directory)
    except OSError:  # ended meanwhile, or not visible from here
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(f"{directory}/{descriptor}") == path:
                return True
        except OSError:
            continue
    return False


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid``'s process."""
    tasks = f"/proc/{pid}/task"
    try:
        threads = os.listdir(tasks)
    except OSError:
        return []
    children: list[int] = []
    for thread in threads:
        try:
            with open(f"{tasks}/{thread}/children", "rb") as file:
                children.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return children
