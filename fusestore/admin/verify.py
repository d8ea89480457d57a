"""``fusestore verify``: read every file back and compare it with its checksums.

Works on the datadirs directly, like ``fusestore check``, with or without a
mount. Each regular file directly in a datadir (never the private
``.fusestore`` area, never through a symlink: opened ``O_NOFOLLOW``) whose
checksum record (``fusestore/pool/checksums.py``) still belongs to it is read
to the end and its digests computed again: equal, it gets a verified stamp;
different, it is *corrupt*. A file without a current record is *unverified*
and is not read (there is nothing to compare it with), unless ``--fill``
asks for its checksums to be computed and stored.

Nothing is believed that changed under the reader: the file's size, mtime
and ctime are taken before and after reading (and after every chunk, so a
file being rewritten is given up at once); if they moved, the file is
skipped as *being written*, never called corrupt, and nothing is stored for
it. So a scrub killed halfway has changed nothing but verified stamps (and,
with ``--fill``, the records of files that had none that matched), and
each datadir's summary, ``.fusestore/verify.json``, is only replaced
(atomically, by ``rename``) at the end of a whole pass of it.

The page cache: a scrub reads every byte of the pool once, and will not
read it again for days. Left cached, those pages would push out what
production reads again and again (Glance serving the same images, VMs
booting from them). So each file is read with ``POSIX_FADV_SEQUENTIAL``
(larger read-ahead) and given back with ``POSIX_FADV_DONTNEED`` once read.
The price: a file that production had cached while the scrub read it is
dropped too and read from the disk next time. ``--rate`` caps the read rate
so that the disks keep time for production.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from fusestore.admin.check import datadirs_of
from fusestore.admin.progress import Pacer, Progress
from fusestore.admin.verifysummary import SUMMARY_FILE, write_summary
from fusestore.pool import checksums
from fusestore.pool.config import ConfigError
from fusestore.pool.datadirs import pool_files
from fusestore.service.settings import resolve

SCHEMA_VERSION = 1

# What a finding is; only the first three make ``verify`` fail.
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
CHANGED = "changed"  # other bytes than checksummed, and another size or mtime
RESTAMPED = "restamped"  # the checksummed bytes, under another mtime
UNVERIFIED = "unverified"
FILLED = "filled"
SKIPPED = "skipped"
NO_XATTRS = "no-user-xattrs"
NOT_STORED = "not-stored"


@dataclass
class Finding:
    """Something one file (or, with no name, a whole datadir) showed."""

    kind: str
    datadir: str
    name: str | None = None
    detail: str = ""
    algorithm: str | None = None
    expected: str | None = None
    found: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, "")}

    def line(self) -> str:
        where = f"{self.name!r} in {self.datadir}" if self.name is not None else self.datadir
        if self.kind in (CORRUPT, CHANGED):
            mismatch = f"{self.algorithm} expected {self.expected}, found {self.found}"
            return f"{self.kind}: {where}: {mismatch}{f' ({self.detail})' if self.detail else ''}"
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class Tally:
    """Counts of one pass (a datadir's, or all of them)."""

    files: int = 0
    bytes_read: int = 0
    verified: int = 0
    unverified: int = 0
    filled: int = 0
    skipped: int = 0
    corrupt: int = 0
    changed: int = 0
    unreadable: int = 0
    corrupt_names: list[str] = field(default_factory=list)
    unreadable_names: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.changed or self.unreadable)

    def add(self, other: Tally) -> None:
        for key, value in asdict(other).items():
            if isinstance(value, int):
                setattr(self, key, getattr(self, key) + value)

    def counts(self) -> dict[str, int]:
        return {key: value for key, value in asdict(self).items() if isinstance(value, int)}


def datadirs_to_verify(target: str, only: str | None = None) -> list[str]:
    """The datadir paths of ``target`` (as ``check`` finds them), or just ``only``."""
    paths = [spec.path for spec in datadirs_of(target)]
    if only is None:
        return paths
    wanted = os.path.realpath(only)
    chosen = [path for path in paths if os.path.realpath(path) == wanted]
    if not chosen:
        raise ConfigError(
            f"--datadir {only!r} is not a datadir of {target!r} (its datadirs: {', '.join(paths)})"
        )
    return chosen


def fill_algorithms(target: str) -> tuple[str, ...]:
    """What ``--fill`` computes: the pool's algorithms (asked of the daemon when
    ``target`` is its mountpoint, read from a config file), else the default
    ones; also when the pool computes none, since ``--fill`` asks for some."""
    configured: Any = None
    if os.path.isfile(target):
        configured = getattr(resolve(target, {}).pool_config(), "checksums", None)
    elif os.path.isdir(target) and os.path.ismount(target):
        from fusestore.admin import status

        try:
            configured = status.read(target).get("checksums")
        except status.NotAPool as exc:
            raise ConfigError(str(exc)) from exc
    if configured:
        return checksums.check_algorithms(configured)
    return checksums.DEFAULT_ALGORITHMS


def _regular_files(datadir: str) -> list[tuple[str, int]]:
    """(name, size) of the regular files directly in ``datadir``, by name."""
    return sorted((name, st.st_size) for name, st in pool_files(datadir))


def _keeps_xattrs(datadir: str) -> bool:
    """Whether the datadir's filesystem keeps user xattrs; read-only probe
    (the daemon's probe writes a file, and a scrub must not)."""
    try:
        os.getxattr(datadir, checksums.RECORD)
    except OSError as exc:
        if exc.errno in checksums.NO_XATTRS:
            return False
    return True


@dataclass
class Verifier:
    """One run of ``fusestore verify`` over some datadirs."""

    fill: bool = False
    algorithms: tuple[str, ...] = checksums.DEFAULT_ALGORITHMS  # for --fill
    rate: float | None = None  # bytes per second
    report: Callable[[Finding], None] = lambda finding: None
    progress: Progress = field(default_factory=lambda: Progress(0, 0, False))
    _pacer: Pacer = field(init=False)

    def __post_init__(self) -> None:
        self._pacer = Pacer(self.rate)

    def run(self, listed: dict[str, list[tuple[str, int]]]) -> Tally:
        """Verify each datadir's listed files; a summary file after each pass."""
        total = Tally()
        for datadir, files in listed.items():
            tally = self.verify_datadir(datadir, files)
            try:
                write_summary(datadir, tally.counts(), tally.corrupt_names, tally.unreadable_names)
            except OSError as exc:
                self.report(Finding(NOT_STORED, datadir, detail=f"{SUMMARY_FILE}: {exc.strerror}"))
            total.add(tally)
        return total

    def verify_datadir(self, datadir: str, files: list[tuple[str, int]]) -> Tally:
        tally = Tally()
        if not _keeps_xattrs(datadir):
            tally.files = tally.unverified = len(files)
            self.report(
                Finding(
                    NO_XATTRS,
                    datadir,
                    detail=f"its filesystem keeps no user extended attributes: "
                    f"{len(files)} file(s) without checksums",
                )
            )
            for _, size in files:
                self.progress.file_done(size, 0)
            return tally
        unstored: list[str] = []
        for name, size in files:
            read = self.verify_file(datadir, name, tally, unstored)
            self.progress.file_done(size, read)
        if unstored:
            self.report(Finding(NOT_STORED, datadir, detail=f"verified stamps: {unstored[0]}"))
        return tally

    def verify_file(self, datadir: str, name: str, tally: Tally, unstored: list[str]) -> int:
        """Check one file and count it in ``tally``; the bytes read."""
        path = os.path.join(datadir, name)
        try:
            fd = checksums.open_to_read(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP):  # gone, or now a symlink
                tally.files += 1
                self._unreadable(datadir, name, exc, tally)
            return 0
        read = 0
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return 0  # replaced by something else since the listing
            tally.files += 1
            stored = checksums.read_record(fd)
            current = stored if stored and stored.stamp == checksums.Stamp.of(before) else None
            if stored is None and not self.fill:
                tally.unverified += 1
                self.report(Finding(UNVERIFIED, datadir, name, "no checksum"))
                return 0
            # A stale record (size or mtime changed behind the pool's back) is
            # compared too: same bytes, the times alone changed; other bytes,
            # someone wrote the file outside the pool.
            algorithms = tuple(stored.digests) if stored else self.algorithms
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            changed = False

            def on_chunk(nbytes: int) -> bool:
                nonlocal read, changed
                read += nbytes
                tally.bytes_read += nbytes
                self.progress.read(nbytes)
                self._pacer.account(nbytes)
                changed = not checksums.unchanged(before, os.fstat(fd))
                return changed

            digests = checksums.compute(fd, algorithms, before.st_size, on_chunk)
            after = os.fstat(fd)
            if digests is None or changed or not checksums.unchanged(before, after):
                tally.skipped += 1
                why = "being written" if current else "changed while verifying"
                self.report(Finding(SKIPPED, datadir, name, why))
            elif current is not None:
                self._compare(datadir, name, fd, current, digests, tally, unstored)
            elif stored is not None and _mismatch(stored, digests) is None:
                self._restamp(datadir, name, fd, before, stored, tally, unstored)
            elif stored is not None and not self.fill:
                self._changed(datadir, name, stored, digests, tally)
            else:
                self._store(datadir, name, fd, before, stored, digests, tally)
        except OSError as exc:
            self._unreadable(datadir, name, exc, tally)
        finally:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return read

    def _compare(
        self,
        datadir: str,
        name: str,
        fd: int,
        record: checksums.Record,
        digests: dict[str, str],
        tally: Tally,
        unstored: list[str],
    ) -> None:
        mismatch = _mismatch(record, digests)
        if mismatch is not None:
            tally.corrupt += 1
            tally.corrupt_names.append(name)
            algorithm, expected, found = mismatch
            self.report(
                Finding(CORRUPT, datadir, name, algorithm=algorithm, expected=expected, found=found)
            )
            return
        tally.verified += 1
        # Dropped meanwhile (the pool opened it for writing): verified, not stamped.
        if checksums.read_record(fd) != record:
            return
        try:
            checksums.write_verified(fd, record.stamp)
        except OSError as exc:
            unstored.append(f"{name}: {exc.strerror}")

    def _changed(
        self,
        datadir: str,
        name: str,
        record: checksums.Record,
        digests: dict[str, str],
        tally: Tally,
    ) -> None:
        """Other bytes than checksummed, written outside the pool (its mtime or
        size moved too): not rot, but not the image that was stored either."""
        algorithm, expected, found = _mismatch(record, digests)  # type: ignore[misc]
        tally.changed += 1
        tally.corrupt_names.append(name)
        self.report(
            Finding(
                CHANGED,
                datadir,
                name,
                "written outside the pool: its size or mtime differ from the checksummed "
                "file's; --fill stores its new checksums",
                algorithm,
                expected,
                found,
            )
        )

    def _restamp(
        self,
        datadir: str,
        name: str,
        fd: int,
        before: os.stat_result,
        record: checksums.Record,
        tally: Tally,
        unstored: list[str],
    ) -> None:
        """The checksummed bytes, whose times were set outside the pool: the
        record is moved to the new stamp and the file counts as verified."""
        tally.verified += 1
        self.report(
            Finding(RESTAMPED, datadir, name, "its mtime changed outside the pool; bytes intact")
        )
        if checksums.read_record(fd) != record:
            return  # the daemon stored a new one meanwhile
        try:
            stamp = checksums.Stamp.of(before)
            checksums.write_record(fd, checksums.Record(stamp, record.digests))
            checksums.write_verified(fd, stamp)
        except OSError as exc:
            unstored.append(f"{name}: {exc.strerror}")

    def _store(
        self,
        datadir: str,
        name: str,
        fd: int,
        before: os.stat_result,
        stored: checksums.Record | None,
        digests: dict[str, str],
        tally: Tally,
    ) -> None:
        if checksums.read_record(fd) != stored:
            # Someone (the daemon's checksummer) stored one meanwhile: theirs stays.
            tally.unverified += 1
            self.report(Finding(UNVERIFIED, datadir, name, "checksummed meanwhile by another"))
            return
        try:
            checksums.write_record(fd, checksums.Record(checksums.Stamp.of(before), digests))
        except OSError as exc:  # a read-only datadir, say: the file itself is fine
            tally.unverified += 1
            self.report(Finding(UNVERIFIED, datadir, name, f"not stored: {exc.strerror}"))
            return
        tally.filled += 1
        self.report(Finding(FILLED, datadir, name, ", ".join(digests)))

    def _unreadable(self, datadir: str, name: str, exc: OSError, tally: Tally) -> None:
        tally.unreadable += 1
        tally.unreadable_names.append(name)
        self.report(Finding(UNREADABLE, datadir, name, exc.strerror or str(exc)))


def _mismatch(record: checksums.Record, digests: dict[str, str]) -> tuple[str, str, str] | None:
    """The first (algorithm, expected, found) that differ, or None."""
    for algorithm, expected in record.digests.items():
        if digests[algorithm] != expected.lower():
            return algorithm, expected, digests[algorithm]
    return None


def summary_line(tally: Tally, datadirs: list[str]) -> str:
    return (
        f"{'ok' if tally.ok else 'FAILED'}: {tally.files} files in {len(datadirs)} "
        f"datadir(s): {tally.verified} verified, {tally.corrupt} corrupt, {tally.changed} changed, "
        f"{tally.unreadable} unreadable, {tally.unverified} unverified, "
        f"{tally.filled} filled, {tally.skipped} skipped; {tally.bytes_read} bytes read"
    )


def run(
    datadirs: list[str],
    *,
    fill: bool = False,
    algorithms: tuple[str, ...] = checksums.DEFAULT_ALGORITHMS,
    rate_mib: float | None = None,
    as_json: bool = False,
    out: TextIO = sys.stdout,
) -> Tally:
    """Verify ``datadirs``, printing as the command does; the totals."""
    listed: dict[str, list[tuple[str, int]]] = {}
    unlisted: list[Finding] = []
    for datadir in datadirs:
        try:
            listed[datadir] = _regular_files(datadir)
        except OSError as exc:
            unlisted.append(Finding(UNREADABLE, datadir, detail=f"cannot list it: {exc.strerror}"))
    sizes = [size for files in listed.values() for _, size in files]
    progress = Progress(sum(sizes), len(sizes), show=sys.stderr.isatty())
    findings: list[Finding] = []

    def report(finding: Finding) -> None:
        if as_json:
            findings.append(finding)
        else:
            progress.write(finding.line(), out)

    for finding in unlisted:
        report(finding)
    started = time.monotonic()
    verifier = Verifier(
        fill=fill,
        algorithms=algorithms,
        rate=None if rate_mib is None else rate_mib * (1 << 20),
        report=report,
        progress=progress,
    )
    try:
        tally = verifier.run(listed)
    finally:
        progress.close()
    tally.unreadable += len(unlisted)
    if as_json:
        document = {
            "version": SCHEMA_VERSION,
            "ok": tally.ok,
            "datadirs": datadirs,
            "findings": [finding.as_json() for finding in findings],
            "summary": {**tally.counts(), "seconds": round(time.monotonic() - started, 3)},
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        print(summary_line(tally, datadirs), file=out)
    return tally
