"""Extended attributes of pool files: the users' own, and the pool's answers.

``user.*`` attributes are the user's and live on the backing file, so they
move with it on ``rename`` and spill-over and ``cp -a``, ``rsync -X`` and
``setfattr`` work as on a disk. Other namespaces are not the pool's to
offer: ``security.*`` and ``trusted.*`` set through the mount would be set by
the daemon, as root, on the backing file. Reading one answers ENODATA at
once (the kernel asks ``security.capability`` before some writes), setting
one EOPNOTSUPP, as on a filesystem without that namespace.

``user.fusestore.*`` is the pool's own (:data:`OWN`), computed per request
and read-only (EPERM to set or remove):

``user.fusestore.datadir``
    The datadir holding the file (mergerfs calls it ``basepath``).
``user.fusestore.path``
    The backing file's full path (mergerfs: ``fullpath``).
``user.fusestore.<algorithm>``
    The hex digest of the file's bytes, e.g. ``user.fusestore.md5`` — only
    while the checksum record matches the file (``checksums.py``).
``user.fusestore.verified``
    UTC time of the last ``fusestore verify`` that found the file whole.

They are not *listed* (``listxattr``), only answered by name: ``cp -a`` and
``rsync -X`` copy every listed attribute, and would otherwise carry the
pool's answers to another filesystem as if they were the user's — and, copied
back into a pool, fail with EPERM. The record the pool keeps on the backing
file (``user.fusestore.checksums``) is hidden the same way.
"""

from __future__ import annotations

import errno
import os

from fusestore.pool import checksums
from fusestore.pool.checksums import no_follow
from fusestore.pool.errors import failure

USER = "user."
OWN = checksums.PREFIX
DATADIR = OWN + "datadir"
PATH = OWN + "path"


def is_own(attribute: str) -> bool:
    return attribute.startswith(OWN)


def checksum_algorithm(attribute: str) -> str | None:
    """The algorithm an attribute such as ``user.fusestore.md5`` asks for."""
    if not is_own(attribute) or attribute in (DATADIR, PATH, checksums.VERIFIED):
        return None
    return attribute[len(OWN) :]


def own_value(attribute: str, target: int | str, datadir: str, path: str | None) -> bytes:
    """The pool's answer for one of its attributes, or ENODATA."""
    if attribute == DATADIR:
        return datadir.encode()
    if attribute == PATH and path is not None:
        return path.encode()
    if attribute in (PATH, checksums.RECORD):
        raise failure(errno.ENODATA, attribute)
    st = os.stat(target, **no_follow(target))
    if attribute == checksums.VERIFIED:
        when = checksums.read_verified(target, st)
        if when is None:
            raise failure(errno.ENODATA, f"{attribute}: never verified as it is now")
        return when.encode()
    record = checksums.current_record(target, st)
    algorithm = checksum_algorithm(attribute)
    if record is None or algorithm not in record.digests:
        raise failure(errno.ENODATA, f"{attribute}: no checksum of the file as it is now")
    return record.digests[algorithm].encode()


def get(attribute: str, target: int | str) -> bytes:
    """A user attribute of the backing file."""
    if not attribute.startswith(USER):
        raise failure(errno.ENODATA, attribute)
    return os.getxattr(target, attribute, **no_follow(target))


def names(target: int | str) -> list[str]:
    """The user attributes of the backing file, without the pool's own."""
    try:
        found = os.listxattr(target, **no_follow(target))
    except OSError as exc:
        if exc.errno in checksums.NO_XATTRS:
            return []
        raise
    return [name for name in found if name.startswith(USER) and not is_own(name)]


def check_changeable(attribute: str) -> None:
    """Refuse to set or remove anything but a user's own attribute."""
    if is_own(attribute):
        raise failure(errno.EPERM, f"{attribute} is fusestore's own and read-only")
    if not attribute.startswith(USER):
        raise failure(errno.EOPNOTSUPP, f"{attribute}: the pool keeps only user.* attributes")


def copy_all(source_fd: int, target_fd: int) -> None:
    """Every extended attribute of one file onto another (a move between datadirs).

    Raises the first failure: a target whose filesystem keeps no user
    attributes (EOPNOTSUPP) would lose them.
    """
    try:
        found = os.listxattr(source_fd)
    except OSError as exc:
        if exc.errno in checksums.NO_XATTRS:
            return
        raise
    for name in found:
        try:
            value = os.getxattr(source_fd, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue  # removed meanwhile
            raise
        os.setxattr(target_fd, name, value)
