"""Parse and validate what the user says about the pool.

This module owns the *syntax* of pool settings: datadir specs in Glance's
``PATH[:PRIORITY]`` form, sizes such as ``16M``, and the rule that a pool is
given by exactly one of ``--datadir`` or ``--datadirs``. It touches no files:
whether a datadir exists or can be written is the pool's business
(:mod:`fusestore.pool.pool`), so the rules here can be tested alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_PRIORITY_RE = re.compile(r"[0-9]+")
_SIZE_RE = re.compile(r"([0-9]+)\s*([KMGT]?)(I?B)?", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CHECKSUM_SEPARATORS = re.compile(r"[\s,:+]+")

# Glance's ``checksum`` is an md5; sha256 is what an operator compares today.
DEFAULT_CHECKSUMS = ("md5", "sha256")
# The word that turns checksums off where a list cannot be empty (-o, the command line).
NO_CHECKSUMS = "none"


class ConfigError(ValueError):
    """A setting the pool cannot run with; the message names the bad value."""


@dataclass(frozen=True)
class DatadirSpec:
    """One backing directory of the pool and its priority (higher wins)."""

    path: str
    priority: int = 0


# 1 GiB: see PoolConfig.passthrough_headroom and README *Performance*.
DEFAULT_PASSTHROUGH_HEADROOM = 1 << 30


@dataclass(frozen=True)
class PoolConfig:
    """Everything the pool needs to place and find files."""

    datadirs: tuple[DatadirSpec, ...]
    min_free_space: int = 0
    sync: bool = True  # fsync a new file and its directory entry before publishing it
    checksums: tuple[str, ...] = DEFAULT_CHECKSUMS  # computed for every new file; () for none
    thin_provisioning: bool = False  # blocks of zeros written to new files become holes
    # Existing files opened for writing in a datadir with more than this free
    # above the reserve are written by the kernel itself (FUSE passthrough):
    # such a write that fills the datadir gets ENOSPC instead of a move.
    passthrough_headroom: int = DEFAULT_PASSTHROUGH_HEADROOM
    # Seconds a datadir's filesystem may leave a request unanswered before it
    # counts as hung (``health.py``): Glance's filesystem_store_timeout.
    datadir_timeout: float = 10.0


def parse_datadir_spec(spec: str, base: str | None = None) -> DatadirSpec:
    """Parse Glance's ``PATH[:PRIORITY]``: the last colon starts the priority.

    Like Glance's ``filesystem_store_datadirs``, a spec without a colon has
    priority 0. A path that itself contains a colon must therefore be given
    with an explicit priority (``/srv/a:b:0``).

    A relative path is taken relative to ``base``; without a base it is an
    error, because mount(8), fstab and systemd start fusestore from any
    directory, and a relative datadir would silently be made wherever that is.
    """
    path, sep, priority_text = spec.rpartition(":")
    if not sep:
        path, priority_text = spec, "0"
    if not path:
        raise ConfigError(f"datadir {spec!r}: empty path")
    if not _PRIORITY_RE.fullmatch(priority_text):
        raise ConfigError(
            f"datadir {spec!r}: priority {priority_text!r} is not a non-negative integer"
        )
    if not os.path.isabs(path):
        if base is None:
            raise ConfigError(
                f"datadir {spec!r}: relative path; mount(8), fstab and systemd run "
                "fusestore from any directory, so give an absolute path"
            )
        path = os.path.join(base, path)
    return DatadirSpec(path=os.path.normpath(path), priority=int(priority_text))


def absolute_spec(spec: str, base: str) -> str:
    """``spec`` with a relative path made absolute against ``base`` (priority kept)."""
    parsed = parse_datadir_spec(spec, base)
    return f"{parsed.path}:{parsed.priority}"


def split_list(text: str) -> list[str]:
    """Split a comma-separated list where ``\\,`` is a comma and ``\\\\`` a backslash.

    mount(8) passes its SOURCE and ``-o`` options to fusestore as they are
    written (fstab turns only octal escapes such as ``\\040`` into characters),
    so a backslash before a comma is the one way to put a comma in a datadir
    path there. Empty items are dropped.
    """
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    items.append("".join(current))
    return [item for item in items if item]


def escape_list_item(item: str) -> str:
    """The inverse of :func:`split_list` for one item."""
    return item.replace("\\", "\\\\").replace(",", "\\,")


def parse_size(text: str) -> int:
    """Parse a byte count: plain bytes or a binary K/M/G/T suffix (``16M`` = 16 MiB)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"size {text!r}: expected bytes or a number with K, M, G or T")
    number, unit, _ = match.groups()
    return int(number) * _SIZE_FACTORS[unit.upper()]


def parse_checksums(value: str | Iterable[str]) -> tuple[str, ...]:
    """The checksum algorithms, lower-cased and each once, or ConfigError naming a bad one.

    A list (TOML), or one string with the names separated by ``:``, ``+``,
    ``,`` or spaces (``-o checksums=md5:sha256``, ``--checksums md5,sha256``);
    ``none`` or an empty list for no checksums. Any of hashlib's
    fixed-length algorithms; the SHAKEs are refused, since their digest
    length would be one more setting.
    """
    names = _CHECKSUM_SEPARATORS.split(value) if isinstance(value, str) else list(value)
    checked: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name or (name == NO_CHECKSUMS and isinstance(value, str)):
            continue
        if name.startswith("shake_") or name not in hashlib.algorithms_available:
            known = ", ".join(
                sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake_"))
            )
            raise ConfigError(
                f"checksum algorithm {raw!r} is not known (use any of: {known}; or {NO_CHECKSUMS})"
            )
        if name not in checked:
            checked.append(name)
    return tuple(checked)


DEFAULT_DATADIR_TIMEOUT = 10.0


def _headroom(value: str | int) -> int:
    headroom = parse_size(value) if isinstance(value, str) else value
    if headroom < 0:
        raise ConfigError(f"passthrough_headroom {value!r} is negative")
    return headroom


_SECONDS_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*s?\s*")


def parse_seconds(setting: str, value: str | float) -> float:
    """A positive number of seconds: ``10``, ``2.5``, ``"10s"``; ConfigError names the setting."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _SECONDS_RE.fullmatch(value):
        seconds = float(value.strip().rstrip("s"))
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{setting} {value!r} is not a positive number of seconds")
    return seconds


def build_pool_config(
    datadir: str | None,
    datadirs: Sequence[str] | None,
    min_free_space: str | int = 0,
    sync: bool = True,
    checksums: str | Iterable[str] = DEFAULT_CHECKSUMS,
    thin_provisioning: bool = False,
    passthrough_headroom: str | int = DEFAULT_PASSTHROUGH_HEADROOM,
    datadir_timeout: str | float = DEFAULT_DATADIR_TIMEOUT,
) -> PoolConfig:
    """Combine the single-datadir and list forms into one validated config."""
    if datadir is not None and datadirs:
        raise ConfigError("give either --datadir or --datadirs, not both")
    if datadir is None and not datadirs:
        raise ConfigError("no datadir given: use --datadir PATH or --datadirs PATH[:PRIORITY]")
    if datadir is not None:
        if not datadir:
            raise ConfigError("datadir '': empty path")
        specs = [parse_datadir_spec(f"{datadir}:0")]
    else:
        specs = [parse_datadir_spec(spec) for spec in datadirs or ()]
    seen: set[str] = set()
    for spec in specs:
        if spec.path in seen:
            raise ConfigError(f"datadir {spec.path!r} is named twice")
        seen.add(spec.path)
    if isinstance(min_free_space, str):
        min_free_space = parse_size(min_free_space)
    if min_free_space < 0:
        raise ConfigError(f"min_free_space {min_free_space!r} is negative")
    return PoolConfig(
        datadirs=tuple(specs),
        min_free_space=min_free_space,
        sync=sync,
        checksums=parse_checksums(checksums),
        thin_provisioning=thin_provisioning,
        passthrough_headroom=_headroom(passthrough_headroom),
        datadir_timeout=parse_seconds("datadir_timeout", datadir_timeout),
    )
