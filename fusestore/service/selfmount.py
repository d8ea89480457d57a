"""Keep the daemon off its own mountpoint.

A daemon that reads a path below its own mountpoint sends a FUSE request to
itself and waits for an answer that only it could give. With FUSE over
io_uring that cannot even be killed: the process stays a zombie with a thread
in D state until the machine reboots. So every path the daemon will use — its
datadirs, its config, metadata and log files — is checked before anything is
mounted (and again on reload), and refused if it is the mountpoint, lies
below it, or (for a datadir) contains it.

Symlinks are resolved here by hand, one component at a time, because
``os.path.realpath`` would ``lstat`` each component — and an ``lstat`` of a
component inside the mount, on reload, is exactly the request to itself this
module exists to prevent. Components are only looked at while they are
outside the mountpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from fusestore.pool.config import ConfigError, DatadirSpec

_MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)


def _within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both absolute and normal)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def resolve_outside(path: str, mountpoint: str) -> str:
    """``path`` with every symlink resolved, stopping where it enters ``mountpoint``.

    ``mountpoint`` must already be resolved (``os.path.realpath`` before
    mounting). Components that do not exist yet are taken as written. The
    result is the real path, or a path at or below the mountpoint if the walk
    entered it; no component at or below the mountpoint is ever looked at.
    """
    pending = os.path.abspath(path).split("/")[::-1]
    resolved = "/"
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        if _within(candidate, mountpoint):
            if candidate != mountpoint:
                # Inside the mount; what follows cannot lead out of it but by
                # "..", which the mountpoint's own path answers.
                rest = "/".join(reversed(pending))
                return os.path.normpath(os.path.join(candidate, rest))
            resolved = candidate  # a directory: it was resolved already
            continue
        try:
            target = os.readlink(candidate)
        except FileNotFoundError:
            rest = "/".join(reversed(pending))
            return os.path.normpath(os.path.join(candidate, rest))
        except OSError:
            resolved = candidate  # not a symlink (EINVAL), or not readable: as it is
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise ConfigError(f"path {path!r}: too many levels of symbolic links")
        if target.startswith("/"):
            resolved = "/"
        pending.extend(target.split("/")[::-1])
    return resolved


def refuse_own_mountpoint(
    mountpoint: str, datadirs: Iterable[DatadirSpec], files: Mapping[str, str | None]
) -> None:
    """ConfigError naming both paths if the daemon would have to read its own mount.

    ``datadirs`` may neither be the mountpoint, nor lie below it, nor contain
    it (a lookup of the mountpoint's name in that datadir would stat the
    mount); ``files`` (what each is, by path) may not lie below it.
    """
    for spec in datadirs:
        real = resolve_outside(spec.path, mountpoint)
        via = "" if real == spec.path else f" (which is {real!r})"
        if _within(real, mountpoint):
            place = "is" if real == mountpoint else "lies inside"
            raise ConfigError(
                f"datadir {spec.path!r}{via} {place} the mountpoint {mountpoint!r}: "
                "the daemon would wait on its own mount"
            )
        if _within(mountpoint, real):
            raise ConfigError(
                f"mountpoint {mountpoint!r} lies inside datadir {spec.path!r}{via}: "
                "the daemon would wait on its own mount"
            )
    for what, path in files.items():
        if path is None:
            continue
        real = resolve_outside(path, mountpoint)
        if _within(real, mountpoint):
            raise ConfigError(
                f"{what} {path!r} lies inside the mountpoint {mountpoint!r}: "
                "the daemon would wait on its own mount"
            )
