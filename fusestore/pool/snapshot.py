"""A listing of the whole pool: every visible name once, as one snapshot.

Each datadir is read (``listing.py``: large ones side by side on worker
threads), then the names are handed out in parts, one per datadir in lookup
order and one for the files being written, each part without the names
already listed (a file being moved is in two datadirs for a moment). The
first part is made on the calling thread and answered at once; for a large
listing the others are made on a worker while the program reads the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from queue import SimpleQueue
from typing import TypeVar

from fusestore.pool.listing import DatadirLister, is_large, regular_files_or_error

log = logging.getLogger(__name__)

T = TypeVar("T")

# Fewer names than this after a listing's first part are packed at once on
# the calling thread: a worker thread is worth waking for large listings only.
_NAMES_FOR_A_WORKER = 4096


def list_names(
    paths: Sequence[str],
    being_written: list[bytes],
    lister: DatadirLister,
    each: Callable[[list[bytes], int], T],
) -> tuple[T, SimpleQueue[T | BaseException | None]]:
    """Each visible name once, encoded as on disk, handed to ``each`` in parts.

    ``each(names, part)`` is called for each datadir's names (``paths`` in
    lookup order), then for ``being_written``. Returns ``each`` of the first
    datadir's names, made on this thread, and a queue of the others, ended
    by None (or an exception). All datadirs are read before this returns,
    so that the listing is one snapshot of what the caller's lock protects
    (a file being moved shows in one datadir or the other).
    """
    on_workers = {
        path: lister.submit(regular_files_or_error, path) for path in paths[1:] if is_large(path)
    }
    first_names = _usable(paths[0], regular_files_or_error(paths[0]))
    first = each(first_names, 0)
    found = [
        on_workers[path].result() if path in on_workers else regular_files_or_error(path)
        for path in paths[1:]
    ]
    parts = _other_parts(paths, first_names, found, being_written)
    rest: SimpleQueue[T | BaseException | None] = SimpleQueue()
    if sum(len(names) for names in found if isinstance(names, list)) < _NAMES_FOR_A_WORKER:
        _each_part(each, parts, rest)  # waking a worker would cost more
    else:
        lister.submit(_each_part, each, parts, rest)
    return first, rest


def _usable(path: str, found: list[bytes] | OSError) -> list[bytes]:
    """A datadir's names, or none (logged) if it could not be read."""
    if isinstance(found, OSError):
        log.error("cannot list datadir %s: %s", path, found.strerror)
        return []
    return found


def _other_parts(
    paths: Sequence[str],
    first_names: list[bytes],
    found: list[list[bytes] | OSError],
    being_written: list[bytes],
) -> Iterator[list[bytes]]:
    """The names of the datadirs after the first, then of the files being
    written, each without the names of the datadirs before it."""
    usable = [_usable(path, names) for path, names in zip(paths[1:], found, strict=True)]
    usable.append(being_written)
    found.clear()  # so that each part's names are freed once it is made
    every = [first_names, *usable]
    # A name in two datadirs (a copy being moved) is listed once. That is
    # rare: one set of all the names tells whether it happens at all (a
    # million names: 85 ms), and only then are parts filtered name by name.
    # The set is made before the first of these parts (the first part is
    # being read meanwhile) and dropped before they are packed.
    unique = len(set().union(*every)) == sum(map(len, every))
    del every
    seen = set() if unique else set(first_names)
    del first_names
    while usable:
        names = usable.pop(0)
        yield names if unique else [n for n in names if n not in seen]
        if not unique:
            seen.update(names)


def _each_part(
    each: Callable[[list[bytes], int], T],
    parts: Iterator[list[bytes]],
    into: SimpleQueue[T | BaseException | None],
) -> None:
    """``each`` of every part, put in order into ``into``, then None (or what it raised)."""
    try:
        for index, names in enumerate(parts, start=1):
            into.put(each(names, index))
        into.put(None)
    except BaseException as exc:
        into.put(exc)
        raise
