"""The errors the pool raises: ``OSError`` with the errno the caller should see."""

from __future__ import annotations

import os


def failure(code: int, message: str) -> OSError:
    """An ``OSError`` of ``code`` whose text says what it was about."""
    return OSError(code, f"{os.strerror(code)}: {message}")
