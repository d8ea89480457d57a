"""The errors the pool raises: ``OSError`` with the errno the caller should see."""

from __future__ import annotations

import os


def failure(code: int, message: str) -> OSError:
    """An ``OSError`` of ``code`` whose text says what it was about."""
    return OSError(code, f"{os.strerror(code)}: {message}")


class Expected(OSError):
    """An error the caller must see but the log need not repeat per request:
    the pool logged its cause once (a hung datadir's names answer EIO)."""

    already_logged = True


def expected_failure(code: int, message: str) -> OSError:
    """:func:`failure`, as an :class:`Expected` error."""
    return Expected(code, f"{os.strerror(code)}: {message}")
