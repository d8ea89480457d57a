"""``fusestore check``: what in a pool's datadirs needs an operator's eye.

Works on the datadirs directly, so it runs with or without a mount; given a
mountpoint it asks the daemon which datadirs it serves. It never touches a
file that a running daemon is writing (those hold a lock), and ``--fix``
never deletes the copy that reads through the mount see, nor data kept aside
after a lost race: those are for a person to decide.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from fusestore.pool.config import ConfigError, DatadirSpec, parse_datadir_spec, split_list
from fusestore.pool.placement import lookup_order
from fusestore.pool.private import PRIVATE_DIR, PrivateArea
from fusestore.service.settings import resolve


@dataclass
class Findings:
    """Everything ``check`` found, by kind."""

    datadirs: list[DatadirSpec]
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # name -> paths, winner first
    leftovers: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    foreign: list[tuple[str, str]] = field(default_factory=list)  # path, what it is
    unmarked: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.leftovers or self.kept or self.foreign or self.unmarked)


def datadirs_of(target: str) -> list[DatadirSpec]:
    """The datadirs of a mountpoint, a config file, or a ``PATH[:PRIORITY][,…]`` list."""
    if os.path.isfile(target):
        specs = list(resolve(target, {}).pool_config().datadirs)
    elif os.path.isdir(target) and os.path.ismount(target):
        from fusestore.admin import status

        try:
            report = status.read(target)
        except status.NotAPool as exc:
            raise ConfigError(str(exc)) from exc
        specs = [DatadirSpec(row["path"], row["priority"]) for row in report["datadirs"]]
    else:
        specs = [parse_datadir_spec(spec, os.getcwd()) for spec in split_list(target)]
    if not specs:
        raise ConfigError(f"no datadirs in {target!r}")
    for spec in specs:
        if not os.path.isdir(spec.path):
            raise ConfigError(f"datadir {spec.path!r} does not exist")
    return lookup_order(specs)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"


def scan(datadirs: list[DatadirSpec]) -> Findings:
    findings = Findings(datadirs)
    holders: dict[str, list[str]] = {}
    for spec in datadirs:
        private = PrivateArea(spec.path, instance="check")
        if not private.has_mark():
            findings.unmarked.append(spec.path)
        for directory, alive in private.incoming_dirs():
            files = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
            (findings.in_progress if alive else findings.leftovers).extend(files)
        findings.kept.extend(private.kept_files())
        with os.scandir(spec.path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISREG(mode):
                    holders.setdefault(entry.name, []).append(entry.path)
                elif entry.name != PRIVATE_DIR:
                    findings.foreign.append((entry.path, _kind(mode)))
    findings.duplicates = {name: paths for name, paths in holders.items() if len(paths) > 1}
    return findings


def describe(findings: Findings) -> Iterator[str]:
    """One line per finding, then a summary line."""
    for name, paths in sorted(findings.duplicates.items()):
        yield f"duplicate: {name!r} in {len(paths)} datadirs; reads see {paths[0]}"
        for shadowed in paths[1:]:
            yield f"  shadowed copy: {shadowed}"
    for path in findings.leftovers:
        yield f"leftover of an unfinished write: {path} ({os.path.getsize(path)} bytes)"
    for path in findings.kept:
        yield f"kept aside after a lost race for its name (inspect, then remove): {path}"
    for path, kind in findings.foreign:
        yield f"ignored by the pool ({kind}): {path}"
    for path in findings.unmarked:
        yield f"datadir without its mark (disk not mounted? never used?): {path}"
    for path in findings.in_progress:
        yield f"being written by a running daemon (fine): {path}"
    problems = (
        len(findings.duplicates)
        + len(findings.leftovers)
        + len(findings.kept)
        + len(findings.foreign)
        + len(findings.unmarked)
    )
    datadirs = ", ".join(f"{d.path}:{d.priority}" for d in findings.datadirs)
    yield f"{'clean' if not problems else f'{problems} problem(s)'}: {datadirs}"


def fix(findings: Findings) -> Iterator[str]:
    """Remove shadowed duplicates and leftovers; say what was done."""
    for paths in findings.duplicates.values():
        for shadowed in paths[1:]:
            try:
                os.unlink(shadowed)
                yield f"removed shadowed duplicate {shadowed}"
            except OSError as exc:
                yield f"cannot remove {shadowed}: {exc.strerror}"
    for path in findings.leftovers:
        try:
            os.unlink(path)
            yield f"removed leftover {path}"
        except OSError as exc:
            yield f"cannot remove {path}: {exc.strerror}"
