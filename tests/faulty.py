"""The ``faulty_datadir`` fixture: a datadir that fails on demand.

Why it exists: the README's promises about failing disks (*Failed writes*,
*Broken disks*) can only be tested on a disk that fails when a test says so.
``faulty_datadir()`` mounts a faultyfs (``tests/faultyfs.py``) over a fresh
tmpfs and returns a :class:`FaultyDatadir`: use its ``path`` as a fusestore
datadir, make requests on it fail with ``fail(op, name, "EIO")`` and stop
with ``heal()``, look at the bytes under it in ``backing``. To make it hang,
``hang()`` (SIGSTOP of its process; ``resume()`` sends SIGCONT;
``waits_for_fuse(pid)`` tells when a process is blocked on it); the
finaliser resumes and ends it whatever state it is in.

Teardown order matters: a pool on top of a faulty datadir must be unmounted
first. Request ``faulty_datadir`` before ``mount_pool`` (both depend on
``tmpfs``, so pytest then tears the pool down first); the finaliser fails
the test if a fusestore daemon still names the datadir when it runs, after
cleaning up anyway. Test modules import the fixture::

    from tests.faulty import faulty_datadir  # noqa: F401
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, TmpfsFactory, is_closer, is_mounted
from tests.faultyfs import parse_faults

MOUNT_WAIT_SECONDS = 15
STOP_WAIT_SECONDS = 5


@dataclass
class FaultyDatadir:
    """A running faultyfs at ``path``, passing through to the tmpfs ``backing``."""

    path: Path
    backing: Path
    control: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    rules: list[dict[str, str]] = field(default_factory=list)
    name_max: int | None = None

    def fail(self, op: str, name: str, errno_name: str) -> None:
        """From the next request on, ``op`` on ``name`` (a basename, a path
        below the datadir, a glob, or ``"*"``) gets ``errno_name``, e.g. "EIO".

        A rule for the same ``op`` and ``name`` is replaced; see tests/faultyfs.py.
        """
        rule = {"op": op, "name": name, "errno": errno_name}
        rules = [r for r in self.rules if (r["op"], r["name"]) != (op, name)] + [rule]
        self._write(rules)

    def limit_names(self, name_max: int) -> None:
        """From now on statfs reports names of at most ``name_max`` bytes."""
        self.name_max = name_max
        self._write(self.rules)

    def heal(self) -> None:
        """No more faults, from the next request on."""
        self._write([])

    def hang(self) -> None:
        """Stop answering (SIGSTOP), as a disk that stalls or a lost NFS server:
        every request on the datadir waits until :meth:`resume` (or the
        finaliser). Returns once the process is stopped (bounded)."""
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while not self.is_stopped():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"faultyfs at {self.path} did not stop:\n{self.log()}")
            time.sleep(0.005)

    def resume(self) -> None:
        """Answer again (SIGCONT), the requests that waited first; harmless if
        it is not stopped or has ended."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def is_stopped(self) -> bool:
        """Whether the process is stopped by a signal (SIGSTOP): state T in /proc."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] == "T"

    def _write(self, rules: list[dict[str, str]]) -> None:
        document: dict[str, object] = {"faults": rules}
        if self.name_max is not None:
            document["name_max"] = self.name_max
        parse_faults(document)  # a bad rule fails here, not silently in faultyfs
        temporary = self.control.with_name(f"{self.control.name}.tmp")
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, self.control)  # a new inode: faultyfs sees the change
        self.rules = rules

    def log(self) -> str:
        """faultyfs's stderr: each injected fault is a line ``injected EIO into write of 'x'``."""
        return self.log_path.read_text(errors="replace")

    def users(self) -> list[int]:
        """Other processes whose command line names this datadir (a fusestore daemon on it)."""
        path = str(self.path)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (os.getpid(), self.process.pid):
                continue
            if is_closer(entry):
                continue
            try:
                arguments = os.fsdecode((entry / "cmdline").read_bytes()).split("\0")
            except OSError:
                continue
            if any(a == path or a.startswith(f"{path}:") for a in arguments):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Unmount and end the process, stopped (SIGSTOP) or not; never raises.

        ``fusermount3 -u``, or ``-uz`` (lazily) where files are still open on it.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        for flags in ("-u", "-uz"):
            if not is_mounted(self.path):
                break
            unmount = subprocess.run(
                ["fusermount3", flags, str(self.path)], capture_output=True, check=False
            )
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while unmount.returncode == 0 and is_mounted(self.path):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_WAIT_SECONDS)


FaultyFactory = Callable[..., FaultyDatadir]


def start_faultyfs(backing: Path, path: Path, control: Path, log_path: Path) -> FaultyDatadir:
    """Run ``python -m tests.faultyfs`` and wait (bounded) until it answers at ``path``."""
    path.mkdir(exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.faultyfs", str(backing), str(path), str(control)],
            cwd=REPO,
            stdout=log_file,
            stderr=log_file,
        )
    faulty = FaultyDatadir(path, backing, control, log_path, process)
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while not is_mounted(path):
        if process.poll() is not None or time.monotonic() > deadline:
            faulty.stop()
            raise RuntimeError(
                f"faultyfs did not mount {path} (exit status {process.returncode}):\n"
                + faulty.log()
            )
        time.sleep(0.02)
    os.stat(path)  # the first request completes FUSE's handshake
    return faulty


def waits_for_fuse(pid: int) -> bool:
    """Whether the process (or thread: a thread id does as well) sleeps
    waiting for a FUSE filesystem's answer (one that is stopped, say).
    /sys/fs/fuse/connections would tell more, but is not mounted everywhere."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "request_wait_answer"
    except OSError:
        return False


@pytest.fixture
def faulty_datadir(tmp_path: Path, tmpfs: TmpfsFactory) -> Iterator[FaultyFactory]:
    """``faulty_datadir(name="faulty", size_mib=64)`` mounts a faultyfs over a new tmpfs.

    Request it before ``mount_pool``, so that pools on it are unmounted first.
    """
    made: list[FaultyDatadir] = []

    def make(name: str = "faulty", size_mib: int = 64) -> FaultyDatadir:
        backing = tmpfs(f"{name}-backing", size_mib)
        faulty = start_faultyfs(
            backing,
            tmp_path / name,
            tmp_path / f"{name}.faults.json",
            tmp_path / f"{name}.faultyfs.log",
        )
        made.append(faulty)
        return faulty

    yield make
    still_used = {str(f.path): f.users() for f in made}
    for faulty in reversed(made):
        faulty.stop()
    still_used = {path: pids for path, pids in still_used.items() if pids}
    if still_used:
        pytest.fail(
            f"faulty datadirs torn down under running pools {still_used}: "
            "request faulty_datadir before mount_pool"
        )
    for faulty in made:
        if "failed unexpectedly" in faulty.log():  # a bug in faultyfs, not an injected fault
            pytest.fail(f"faultyfs at {faulty.path} failed:\n{faulty.log()}")
