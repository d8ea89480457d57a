"""Where settings come from: a TOML config file, command-line flags, ``-o`` options.

Every setting has one name everywhere: ``min_free_space`` in the file, as
``-o min_free_space=4G`` and as ``--min-free-space 4G``. The file is read
first; the command line and ``-o`` override it. A datadir list given on the
command line (or as mount(8)'s SOURCE) replaces the file's.

Errors name the file, the line and the setting, so an operator can fix an
``/etc/fusestore/*.toml`` from the log line alone.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fusestore.pool.config import (
    DEFAULT_CHECKSUMS,
    DEFAULT_DATADIR_TIMEOUT,
    DEFAULT_PASSTHROUGH_HEADROOM,
    ConfigError,
    PoolConfig,
    absolute_spec,
    build_pool_config,
    parse_checksums,
    parse_datadir_spec,
    parse_seconds,
    parse_size,
    split_list,
)

# name -> what the value must be, in a file or a -o option
_STRING, _STRINGS, _SIZE, _BOOL = "a string", "a list of strings", "a size", "true or false"
_COUNT = "a whole number"
_SECONDS = "a positive number of seconds"
_ALGORITHMS = "a list of checksum algorithms (or none)"
_TRANSPORT = "auto, io_uring or devfuse"
SETTINGS: Mapping[str, str] = {
    "datadir": _STRING,
    "datadirs": _STRINGS,
    "min_free_space": _SIZE,
    "no_sync": _BOOL,
    "checksums": _ALGORITHMS,
    "thin_provisioning": _BOOL,
    "passthrough_headroom": _SIZE,
    "datadir_timeout": _SECONDS,
    "busy_poll": _COUNT,
    "transport": _TRANSPORT,
    "no_io_uring": _BOOL,  # the older spelling of transport = "devfuse"
    "metadata_file": _STRING,
    "log_file": _STRING,
    "debug": _BOOL,
    "options": _STRINGS,
}

# Options that mount(8), fstab and systemd use for their own purposes and that
# mean nothing to FUSE; passed through they would make libfuse refuse to mount.
_MOUNT8_ONLY = {"_netdev", "nofail", "noauto", "auto", "user", "users", "nouser", "defaults"}
_MOUNT8_ONLY_PREFIXES = ("x-", "comment=")

# Microseconds the daemon checks for the next request before sleeping (see
# fusestore/fuse/requestloop.py); spinning on a one-CPU machine would only slow the caller.
DEFAULT_BUSY_POLL_US = 50 if (os.cpu_count() or 1) > 1 else 0

# How requests reach the daemon (fusestore/fuse/transport.py): auto measures
# both at mount time and takes the faster.
TRANSPORTS = ("auto", "io_uring", "devfuse")

# Settings that name a file or directory: relative paths in a config file are
# taken relative to the file's own directory; in -o (mount(8), fstab) they are
# refused, since mount(8) runs fusestore from any directory.
PATH_SETTINGS = ("datadir", "metadata_file", "log_file")

_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass
class Settings:
    """Everything a mount is started with, merged from all sources."""

    config_file: str | None = None
    datadir: str | None = None
    datadirs: list[str] = field(default_factory=list)
    min_free_space: int = 0
    no_sync: bool = False
    checksums: tuple[str, ...] = DEFAULT_CHECKSUMS
    thin_provisioning: bool = False
    passthrough_headroom: int = DEFAULT_PASSTHROUGH_HEADROOM
    datadir_timeout: float = DEFAULT_DATADIR_TIMEOUT
    busy_poll: int = DEFAULT_BUSY_POLL_US
    transport: str = "auto"
    metadata_file: str | None = None
    log_file: str | None = None
    debug: bool = False
    options: list[str] = field(default_factory=list)

    def pool_config(self) -> PoolConfig:
        return build_pool_config(
            self.datadir,
            self.datadirs,
            self.min_free_space,
            sync=not self.no_sync,
            checksums=self.checksums,
            thin_provisioning=self.thin_provisioning,
            passthrough_headroom=self.passthrough_headroom,
            datadir_timeout=self.datadir_timeout,
        )

    def metadata(self) -> Any:
        """The Glance store metadata file's contents, checked as Glance checks them."""
        if self.metadata_file is None:
            return None
        return read_metadata_file(self.metadata_file)


def parse_transport(value: str) -> str:
    """The ``transport`` setting, checked: one of :data:`TRANSPORTS`."""
    return _check_value("transport", value, "")


def _line_of(text: str, key: str, needle: str | None = None) -> int:
    """Best-effort line number of a setting (or of a value within it) in TOML text."""
    assignment = re.compile(rf"^\s*{re.escape(key)}\s*=")
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if needle is not None and needle in line:
            return number
    for number, line in enumerate(lines, start=1):
        if assignment.match(line):
            return number
    return 0


def _check_value(key: str, value: Any, where: str) -> Any:
    """Type-check one value and normalise it (sizes to bytes)."""
    kind = SETTINGS[key]
    if kind == _STRING and isinstance(value, str):
        return value
    if kind == _STRINGS and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == _BOOL and isinstance(value, bool):
        return value
    if kind == _SIZE and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if kind == _COUNT and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if kind == _COUNT and isinstance(value, str) and value.isdigit():
        return int(value)
    if kind == _SIZE and isinstance(value, str):
        return parse_size(value)
    if kind == _SECONDS and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return parse_seconds(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
    if kind == _TRANSPORT and value in TRANSPORTS:
        return value
    if kind == _ALGORITHMS and isinstance(value, str | list):
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}setting {key!r} must be {kind}, not {value!r}")
        try:
            return parse_checksums(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}setting {key!r}: {exc}") from None
    raise ConfigError(f"{where}setting {key!r} must be {kind}, not {value!r}")


def read_config_file(path: str) -> dict[str, Any]:
    """Read and check a TOML config file; ConfigError names file, line and setting."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror}") from exc
    text = raw.decode("utf-8", errors="replace")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in SETTINGS:
            line = _line_of(text, key)
            known = ", ".join(SETTINGS)
            raise ConfigError(f"{path}:{line}: unknown setting {key!r} (known: {known})")
        where = f"{path}:{_line_of(text, key)}: "
        try:
            values[key] = _check_value(key, value, where)
            if key == "datadirs":
                for spec in values[key]:
                    where_spec = f"{path}:{_line_of(text, key, spec)}: "
                    _check_spec(spec, where_spec, os.path.dirname(os.path.abspath(path)))
        except ConfigError as exc:
            message = str(exc)
            if not message.startswith(path):
                message = f"{where}setting {key!r}: {message}"
            raise ConfigError(message) from exc
    if "datadir" in values and "datadirs" in values:
        line = _line_of(text, "datadirs")
        raise ConfigError(f"{path}:{line}: give either 'datadir' or 'datadirs', not both")
    try:
        values = without_no_io_uring(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}:{_line_of(text, 'no_io_uring')}: {exc}") from None
    return _relative_to(os.path.dirname(os.path.abspath(path)), values)


def without_no_io_uring(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the older ``no_io_uring`` spelled as ``transport``.

    Turned into ``transport`` within each source, so that the command line
    overrides a file whichever spelling each uses.
    """
    if "no_io_uring" not in values:
        return values
    values = dict(values)
    if values.pop("no_io_uring"):
        if values.get("transport", "devfuse") != "devfuse":
            raise ConfigError(
                f"no_io_uring and transport = {values['transport']!r} contradict each other"
            )
        values["transport"] = "devfuse"
    return values


def _relative_to(base: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config file's paths, relative ones taken from the file's own directory."""
    for key in PATH_SETTINGS:
        if values.get(key):  # "" stays an error
            values[key] = os.path.normpath(os.path.join(base, values[key]))
    if "datadirs" in values:
        values["datadirs"] = [absolute_spec(spec, base) for spec in values["datadirs"]]
    return values


def _check_spec(spec: str, where: str, base: str | None = None) -> None:
    try:
        parse_datadir_spec(spec, base)
    except ConfigError as exc:
        raise ConfigError(f"{where}setting 'datadirs': {exc}") from exc


def split_mount_options(options: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Sort ``-o`` options into pool settings and options for FUSE.

    mount(8)-only options (``_netdev``, ``nofail``, ``x-systemd.*``, …) are
    dropped. ``datadirs=PATH[:PRIORITY]`` may be repeated, one datadir each.
    ``\\,`` is a comma inside a value (:func:`~fusestore.pool.config.split_list`).
    Paths must be absolute: mount(8) runs fusestore from any directory.
    """
    settings: dict[str, Any] = {}
    fuse_options: list[str] = []
    for option in (o for value in options for o in split_list(value)):
        key, sep, value = option.partition("=")
        if key in SETTINGS and key != "options":
            where = f"-o {option}: "
            kind = SETTINGS[key]
            if kind == _BOOL:
                lowered = value.lower()
                if lowered not in _TRUE | _FALSE:
                    raise ConfigError(f"{where}setting {key!r} must be {kind}, not {value!r}")
                settings[key] = lowered in _TRUE
            elif not sep or not value:
                raise ConfigError(f"{where}setting {key!r} needs a value")
            elif kind == _STRINGS:
                _check_spec(value, where)
                settings.setdefault(key, []).append(value)
            else:
                settings[key] = _check_value(key, value, where)
                if key in PATH_SETTINGS and not os.path.isabs(value):
                    raise ConfigError(
                        f"{where}setting {key!r}: relative path {value!r}; mount(8), fstab "
                        "and systemd run fusestore from any directory, so give an absolute path"
                    )
        elif option in _MOUNT8_ONLY or option.startswith(_MOUNT8_ONLY_PREFIXES):
            continue
        else:
            fuse_options.append(option)
    return without_no_io_uring(settings), fuse_options


def resolve(config_file: str | None, overrides: Mapping[str, Any]) -> Settings:
    """Merge the file (if any) with the overrides from the command line and -o."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    if overrides.get("datadir") is not None or overrides.get("datadirs"):
        values.pop("datadir", None)
        values.pop("datadirs", None)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "options":
            values["options"] = [*values.get("options", []), *value]
        else:
            values[key] = value
    return Settings(config_file=config_file, **values)


def read_metadata_file(path: str) -> Any:
    """Glance's ``filesystem_store_metadata_file``: a JSON object (or a list of them)
    each with an ``id`` and a ``mountpoint``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"metadata file {path!r} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"metadata file {path!r} is not valid JSON: {exc}") from exc
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        if not isinstance(entry, dict) or not {"id", "mountpoint"} <= entry.keys():
            raise ConfigError(
                f"metadata file {path!r}: each entry must be an object with 'id' and 'mountpoint'"
            )
    return data
