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
``/proc`` for a descriptor on the file: ``readlink`` of ``/proc/PID/fd/N``
and ``/proc/PID/fdinfo/N`` name its path and inode number without a FUSE
request, unlike ``stat``.

What this cannot see: a descriptor passed over a Unix socket to an
unrelated process, or held by an orphan whose parent ended (it is then
nobody's descendant). Such a file is published at the creator's last close
and written on under its name (README *Writes straight to the disk*).
"""

from __future__ import annotations

import os
import time

# A bound on the processes searched: a creator with a huge family (a
# long-lived shell that started thousands) must not make close() slow.
MAX_PROCESSES = 256
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def clock_ticks() -> int:
    """Now, in the unit and from the origin of a process's start time in
    ``/proc/PID/stat``: clock ticks since boot."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS_PER_SECOND)


def still_open(name: str, inode: int, closing_pid: int, creator_pid: int, since: int = 0) -> bool:
    """Whether a process of the creator's or the closer's family has a
    descriptor on the mount's file ``name``, inode number ``inode``.

    ``closing_pid`` is the thread whose close(2) this is (its descriptor is
    already out of its table); ``creator_pid`` the thread that created the
    file. Either may be 0 (unknown, as for a process in a pid namespace the
    daemon cannot see): it is then not searched. ``since``: when the file
    was created (``clock_ticks``). A child started before that cannot have
    inherited a descriptor of it, nor can its own children, so its branch
    is left out: a program that started other programs earlier (a fusestore
    daemon among them, with dozens of threads and descriptors) would
    otherwise make each close of a new file 0.2-0.4 ms slower.
    """
    todo = [pid for pid in (closing_pid, creator_pid) if pid > 0]
    seen: set[int] = set()
    while todo and len(seen) < MAX_PROCESSES:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if _has_descriptor_on(pid, name, inode):
            return True
        todo.extend(child for child in _children(pid) if _started(child) >= since - 1)
    return False


def _has_descriptor_on(pid: int, name: str, inode: int) -> bool:
    """Whether ``pid`` has a descriptor on the file. By its path's last part
    first (one readlink each), then by inode number (``fdinfo``): the path
    before it is the mount's as the process reaches it, which a bind mount
    or a container's mount namespace makes another than the daemon's."""
    directory = f"/proc/{pid}/fd"
    try:
        descriptors = os.listdir(directory)
    except OSError:  # ended meanwhile, or not visible from here
        return False
    last_part = "/" + name
    for descriptor in descriptors:
        try:
            link = os.readlink(f"{directory}/{descriptor}")
            if link.endswith(last_part) and _inode_of(pid, descriptor) == inode:
                return True
        except OSError:
            continue
    return False


def _inode_of(pid: int, descriptor: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{descriptor}", "rb") as file:
        for line in file:
            if line.startswith(b"ino:"):
                return int(line.split()[1])
    return -1


def _started(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
    except OSError:
        return 0
    return int(fields[19])  # field 22 of stat(5), counted after the name's ")"


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
