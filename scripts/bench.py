"""Side-by-side benchmark: the datadir directly, fusestore, and mergerfs.

Run through ``scripts/bench`` (which installs mergerfs and fio). Every
workload runs on every target in turn, repetition by repetition (A B C A B C
…), so drift of the machine hits all targets alike; the table shows medians
and the ratios fusestore/direct (the direct disk is the physical limit),
fusestore/upstream mergerfs (with --mergerfs) and fusestore/the better of
Debian's two mergerfs targets (higher is better for fusestore: every figure
is a rate).

Targets, over the same backing datadirs (two of them, priorities 10 and 5):
  direct         the first datadir itself
  fusestore      fusestore --no-sync (mergerfs does not fsync on close either),
                 its default transport (auto: measured at each mount; the
                 report lists what each mount chose and why)
  fusestore-sync fusestore with its durable default (fsync before publishing)
  fusestore-devfuse fusestore --no-sync --transport devfuse: requests through /dev/fuse
  fusestore-io_uring fusestore --no-sync --transport io_uring: FUSE over io_uring
  mergerfs       Debian's: category.create=epmfs, minfreespace = fusestore's reserve
  mergerfs-cache the same plus cache.files=auto-full, writeback, attr/entry caching
  mergerfs-X.Y   only with --mergerfs PATH: an upstream mergerfs binary, named by
                 its --version, with category.create=ff, the same minfreespace and
                 UPSTREAM_OPTIONS (FUSE passthrough for reads and writes: root and
                 Linux 6.9+); without it the report says that it was left out

fusestore computes md5 and sha256 of every new file by default, in the
background after close; the rows run with that default unless their name says
``checksums=none``. Files a workload lays down before its measured phase have
their checksums waited for first (``settle``), so that hashing them does not
run during the measurement; the "checksums ready" row measures the hashing.

Moving files between datadirs (issue 13, ``drain``): on each fusestore target
the files of the first datadir are drained into the second through the
daemon's control socket and timed, beside a plain ``cp`` of the same files
between the two datadirs in the same slot (the line under the table gives
move/cp); and two probe processes time requests through the mount in a
loop (``stat``, 4 KiB reads, creates and deletes; ``stat``, 4 KiB reads and
``statvfs``) during a drain of large files and then, as long again, without
one (the longest request in the table, the 99th percentile in a note).

Sparse images (issue 14): a raw image of image_mib MiB (``qemu-img create``)
with two 32 MiB runs of data (``qemu-io``), both written through the target,
copied out of it with ``qemu-img convert -O raw`` to the scratch directory
(MiB/s of its apparent size: with the holes visible, SEEK_DATA/SEEK_HOLE,
the time follows the data); and ``cp`` of a dup_mib MiB file to a new name on
the same target (copy_file_range: through fusestore no READ or WRITE).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import functools
import hashlib
import json
import os
import platform
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

MiB = 1 << 20
T = TypeVar("T")
RESERVE = "64M"
REPO = Path(__file__).resolve().parent.parent
FUSESTORE = [sys.executable, "-m", "fusestore"]
sys.path.insert(0, str(REPO))
from fusestore.admin import status  # noqa: E402


@dataclass
class Sizes:
    seq_mib: int
    fio_mib: int
    fio_seconds: int
    small_files: int
    listing_files: int
    parallel_mib: int
    repetitions: int
    drain_files: int  # moved by the drain row, of drain_mib MiB each
    drain_mib: int
    latency_files: int  # moved while requests are timed, of latency_mib MiB each
    latency_mib: int
    image_mib: int  # apparent size of the sparse image (64 MiB of data in it)
    dup_mib: int  # the file cp duplicates inside the pool


FULL = Sizes(1024, 256, 5, 10_000, 100_000, 256, 5, 4, 256, 4, 256, 4096, 1024)
# tmpfs only: about two minutes
QUICK = Sizes(128, 32, 1, 1_000, 10_000, 32, 1, 4, 64, 4, 128, 4096, 256)


# fusestore's default checksums, kept in the extended attributes below (read
# through the mount; a getxattr of one still being computed waits up to 10 s).
CHECKSUMS = ("md5", "sha256")
CHECKSUM_ATTRIBUTE = "user.fusestore.{}"
CHECKSUMS_OFF = ["--checksums", "none"]

# The upstream mergerfs target (--mergerfs PATH): its name ("mergerfs-2.42",
# from its --version) -> the binary; empty without --mergerfs.
UPSTREAM: dict[str, Path] = {}
# Its options besides category.create=ff and minfreespace: the page cache and
# FUSE passthrough for reads and writes (passthrough.io needs cache.files on,
# and turns cache.writeback off), 1 s attribute, entry and negative entry
# caches as mergerfs-cache and fusestore have, directories opened by two
# threads at once and read in branch order.
UPSTREAM_OPTIONS = [
    "cache.files=auto-full",
    "passthrough.io=rw",
    "cache.attr=1",
    "cache.entry=1",
    "cache.negative_entry=1",
    "func.readdir=cosr:2",
]
# How to build one, for --help.
UPSTREAM_BUILD = """\
upstream mergerfs (--mergerfs PATH), built from its source in a directory SRC
outside this repository (a scratch directory; neither is kept here):
  git clone https://github.com/trapexit/mergerfs SRC
  cd SRC && git checkout 2.42.0   # the newest tag
  make NDEBUG=1 -j"$(nproc)"      # needs g++ and make (libfuse is vendored); -O2
  scripts/bench --quick --mergerfs SRC/build/mergerfs
Without NDEBUG=1 make builds with -O0 -g; its RELEASE= names a container
target of upstream's packaging, not an optimised build."""

# ------------------------------------------------------------------ targets


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kwargs)


def unmount(path: Path) -> None:
    for flags in (["-u"], ["-uz"]):
        if not os.path.ismount(path):
            return
        subprocess.run(["fusermount3", *flags, str(path)], capture_output=True, check=False)
        time.sleep(0.2)


@contextlib.contextmanager
def backing(kind: str, scratch: Path, size_mib: int) -> Iterator[list[Path]]:
    """Two datadirs on tmpfs, or on one loop-mounted ext4 image each."""
    datadirs = [scratch / f"{kind}-a", scratch / f"{kind}-b"]
    for path in datadirs:
        path.mkdir()
        if kind == "tmpfs":
            run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "bench", str(path))
        else:
            image = path.with_suffix(".img")
            with image.open("wb") as f:
                f.truncate(size_mib * MiB)
            run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
            run("mount", "-o", "loop", str(image), str(path))
    try:
        yield datadirs
    finally:
        for path in datadirs:
            subprocess.run(["umount", "-l", str(path)], check=False)


def start_mergerfs(
    name: str, datadirs: list[Path], scratch: Path, mountpoint: Path
) -> subprocess.Popen:
    """mergerfs target ``name`` mounted at ``mountpoint``: its process.

    In the foreground (``-f``), a child of the bench that stop() ends after
    the unmount: mergerfs 2.42.0 (its libfuse's ``fuse_session_loop_mt``)
    now and then stays behind for good once unmounted: a reader thread that
    sees the unmount posts the semaphore the main thread waits on before it
    marks the session exited, and the main thread, finding it not yet
    exited, waits again; SIGTERM ends it. Its output goes to
    ``scratch/<name>.log``.
    """
    binary = "mergerfs"  # Debian's
    options = ["category.create=epmfs", f"minfreespace={RESERVE}", "fsname=mergerfs"]
    if name == "mergerfs-cache":
        options += [
            "cache.files=auto-full",
            "cache.writeback=true",
            "cache.attr=1",
            "cache.entry=1",
            "cache.negative_entry=1",
        ]
    elif name in UPSTREAM:
        binary = str(UPSTREAM[name])
        options = ["category.create=ff", f"minfreespace={RESERVE}", f"fsname={name}"]
        options += UPSTREAM_OPTIONS
    branches = ":".join(str(d) for d in datadirs)
    log = scratch / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, "-f", "-o", ",".join(options), branches, str(mountpoint)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while not os.path.ismount(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            unmount(mountpoint)
            stop(process)
            raise RuntimeError(f"mounting {name} failed: {log.read_text(errors='replace')}")
        time.sleep(0.01)
    if name in UPSTREAM:
        try:
            check_options(name, mountpoint, options)
        except RuntimeError:
            unmount(mountpoint)
            stop(process)
            raise
    return process


def check_options(name: str, mountpoint: Path, options: list[str]) -> None:
    """Each of ``options`` as the mergerfs at ``mountpoint`` reads it back
    through its control file (``.mergerfs``): it takes option names it does
    not know without a word. minfreespace comes back in bytes."""
    wrong = []
    for option in options:
        key, _, wanted = option.partition("=")
        if key == "fsname":
            continue
        try:
            got = os.getxattr(mountpoint / ".mergerfs", f"user.mergerfs.{key.replace('_', '-')}")
        except OSError as exc:
            wrong.append(f"{key}: {exc.strerror}")
            continue
        if key != "minfreespace" and got.decode() != wanted:
            wrong.append(f"{key}={got.decode()}, not {wanted}")
    if wrong:
        raise RuntimeError(f"{name} did not take its options: {'; '.join(wrong)}")


def stop(process: subprocess.Popen, seconds: float = 2) -> None:
    """Wait for an unmounted mergerfs to exit (a few ms), else end it."""
    for end in (None, process.terminate, process.kill):
        if end is not None:
            print(
                f"    {Path(process.args[0]).name} (pid {process.pid}) still running "
                f"{seconds:g} s after its unmount: {end.__name__}",
                file=sys.stderr,
                flush=True,
            )
            end()
        try:
            process.wait(seconds)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def mounted(
    name: str, datadirs: list[Path], scratch: Path, options: Sequence[str] = ()
) -> Iterator[Path]:
    """The target mounted over ``datadirs``; ``options`` go to fusestore only."""
    if name == "direct":
        yield datadirs[0]
        return
    mountpoint = scratch / f"mnt-{name}"
    mountpoint.mkdir(exist_ok=True)
    process = None
    if name.startswith("fusestore"):
        args = [*FUSESTORE, "mount", "--min-free-space", RESERVE]
        args += ["--datadirs", f"{datadirs[0]}:10", "--datadirs", f"{datadirs[1]}:5"]
        if name in ("fusestore", "fusestore-devfuse", "fusestore-io_uring"):
            args.append("--no-sync")
        if name in ("fusestore-devfuse", "fusestore-io_uring"):
            args += ["--transport", name.removeprefix("fusestore-")]
        args += options
        args += ["--log-file", str(scratch / f"{name}.log"), str(mountpoint)]
        try:
            run(*args)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"mounting {name} failed: {exc.stderr.strip()}") from exc
    else:
        process = start_mergerfs(name, datadirs, scratch, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        if process is not None:
            stop(process)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------- workloads


def write_file(path: Path, size: int, block: int = MiB, data: bytes | None = None) -> None:
    data = data or os.urandom(block)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // block):
            os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: Path, block: int = MiB) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, block):
            total += len(chunk)
    finally:
        os.close(fd)
    return total


def settle(path: Path) -> None:
    """Wait until fusestore has stored the checksums of ``path`` (a file just
    written through it), so that a measurement after this does not share the
    CPU with their computation. Elsewhere (the datadir, mergerfs, a fusestore
    without checksums) the getxattr fails at once; through fusestore it waits
    up to 10 s, and is asked again (a few times) when that was not enough."""
    for _ in range(6):
        asked = time.monotonic()
        try:
            os.getxattr(path, CHECKSUM_ATTRIBUTE.format("sha256"))
        except OSError:
            if time.monotonic() - asked < 5:
                return
        else:
            return


def timed(action: Callable[[], object]) -> float:
    # Write back what earlier runs left dirty first: the targets follow each
    # other in the same cyclic order every repetition, and without this one
    # target always paid for the writeback of the one before it (`cp` into an
    # ext4 pool: 451 MiB/s for fusestore, right after `direct`; 1,565 with it).
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def w_seq_write(root: Path, sizes: Sizes) -> float:
    size = sizes.seq_mib * MiB
    seconds = timed(lambda: write_file(root / "seq", size))
    (root / "seq").unlink()
    return size / MiB / seconds


def _seq_read(root: Path, sizes: Sizes, cold: bool) -> float:
    size = sizes.seq_mib * MiB
    write_file(root / "seq", size)
    settle(root / "seq")
    if cold:
        drop_caches()
    else:
        read_file(root / "seq")
    seconds = timed(lambda: read_file(root / "seq"))
    (root / "seq").unlink()
    return size / MiB / seconds


def w_seq_read_cold(root: Path, sizes: Sizes) -> float:
    return _seq_read(root, sizes, cold=True)


def w_seq_read_warm(root: Path, sizes: Sizes) -> float:
    return _seq_read(root, sizes, cold=False)


def _fio(root: Path, sizes: Sizes, mode: str, jobs: int) -> float:
    target = root / "fio.dat"
    write_file(target, sizes.fio_mib * MiB)
    settle(target)
    os.sync()  # as in timed(): no writeback of earlier runs during this one
    out = run(
        "fio",
        "--name=bench",
        f"--filename={target}",
        f"--rw={mode}",
        "--bs=4k",
        f"--size={sizes.fio_mib}M",
        "--ioengine=psync",
        f"--numjobs={jobs}",
        f"--runtime={sizes.fio_seconds}",
        "--time_based",
        "--group_reporting",
        "--output-format=json",
    ).stdout
    target.unlink()
    job = json.loads(out)["jobs"][0]
    side = "read" if "read" in mode else "write"
    return float(job[side]["iops"])


def w_randread_1(root: Path, sizes: Sizes) -> float:
    return _fio(root, sizes, "randread", 1)


def w_randread_4(root: Path, sizes: Sizes) -> float:
    return _fio(root, sizes, "randread", 4)


def w_randwrite_1(root: Path, sizes: Sizes) -> float:
    return _fio(root, sizes, "randwrite", 1)


def w_randwrite_4(root: Path, sizes: Sizes) -> float:
    return _fio(root, sizes, "randwrite", 4)


def w_small_files(root: Path, sizes: Sizes) -> dict[str, float]:
    """Create, stat, list and delete many 4 KiB files: one rate per phase."""
    names = [root / f"small-{i:06d}" for i in range(sizes.small_files)]
    data = b"x" * 4096

    def create() -> None:
        for path in names:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)

    phases = {
        "create": create,
        "stat": lambda: [os.stat(p) for p in names],
        "list": lambda: os.listdir(root),
        "delete": lambda: [os.unlink(p) for p in names],
    }
    rates = {}
    for phase, action in phases.items():
        rates[f"4 KiB files: {phase}"] = sizes.small_files / timed(action)
        if phase == "create":
            settle(names[-1])  # checksummed in order: the last one is the last done
    return rates


def w_parallel_write(root: Path, sizes: Sizes) -> float:
    size = sizes.parallel_mib * MiB
    threads = [
        threading.Thread(target=write_file, args=(root / f"par-{i}", size)) for i in range(4)
    ]

    def go() -> None:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    seconds = timed(go)
    for i in range(4):
        (root / f"par-{i}").unlink()
    return 4 * size / MiB / seconds


def w_cp_in(root: Path, sizes: Sizes) -> float:
    source = Path(os.environ["BENCH_SOURCE"])
    seconds = timed(lambda: run("cp", str(source), str(root / "copied")))
    (root / "copied").unlink()
    return source.stat().st_size / MiB / seconds


def w_cp_out(root: Path, sizes: Sizes) -> float:
    source = Path(os.environ["BENCH_SOURCE"])
    run("cp", str(source), str(root / "copied"))
    settle(root / "copied")
    out = source.with_name("copied-out")
    seconds = timed(lambda: run("cp", str(root / "copied"), str(out)))
    (root / "copied").unlink()
    out.unlink()
    return source.stat().st_size / MiB / seconds


@functools.cache
def _block() -> bytes:
    """One random MiB, written over and over by w_checksums_ready."""
    return os.urandom(MiB)


@functools.cache
def _digests_of(size: int) -> dict[str, str]:
    """What hashlib makes of ``size`` bytes of _block() repeated."""
    hashers = [hashlib.new(name) for name in CHECKSUMS]
    for _ in range(size // MiB):
        for hasher in hashers:
            hasher.update(_block())
    return {name: hasher.hexdigest() for name, hasher in zip(CHECKSUMS, hashers, strict=True)}


def _hash_back(path: Path) -> dict[str, str]:
    """The checksums of a file read back by this program, as fusestore does
    (one read of 1 MiB chunks for all algorithms)."""
    hashers = [hashlib.new(name) for name in CHECKSUMS]
    buffer = bytearray(MiB)
    with path.open("rb", buffering=0) as f:
        while got := f.readinto(buffer):
            for hasher in hashers:
                hasher.update(memoryview(buffer)[:got])
    return {name: hasher.hexdigest() for name, hasher in zip(CHECKSUMS, hashers, strict=True)}


def _stored_digests(path: Path, deadline: float) -> dict[str, str]:
    """The checksums fusestore stored for ``path``, waiting until ``deadline``."""
    while True:
        asked = time.monotonic()
        try:
            raw = os.getxattr(path, CHECKSUM_ATTRIBUTE.format("sha256"))
            break
        except OSError as exc:
            # ENODATA after the mount's 10 s wait: still being computed, ask
            # again; ENODATA at once: none pending, none will come.
            waited = time.monotonic() - asked
            if exc.errno != errno.ENODATA or waited < 5 or time.monotonic() > deadline:
                raise RuntimeError(f"no sha256 of {path} through the mount: {exc}") from exc
    return {
        name: raw.decode()
        if name == "sha256"
        else os.getxattr(path, CHECKSUM_ATTRIBUTE.format(name)).decode()
        for name in CHECKSUMS
    }


def w_checksums_ready(root: Path, sizes: Sizes) -> float:
    """MiB/s from the start of writing a file until its md5 and sha256 are known.

    Through fusestore: until ``getxattr`` of its sha256 returns (the daemon
    hashes the file after ``close``, in the background). Elsewhere the program
    writes the file and then reads it back to hash it itself. Either way the
    digests must be hashlib's of the bytes written, or the bench stops.
    """
    size = sizes.seq_mib * MiB
    path = root / "summed"
    fusestore = _is_fusestore(root)
    got: dict[str, str] = {}

    def write_and_sum() -> None:
        write_file(path, size, data=_block())
        if fusestore:
            got.update(_stored_digests(path, time.monotonic() + 300))
        else:
            got.update(_hash_back(path))

    seconds = timed(write_and_sum)
    path.unlink()
    if got != _digests_of(size):
        raise RuntimeError(f"checksums of {path}: got {got}, hashlib says {_digests_of(size)}")
    return size / MiB / seconds


def _is_fusestore(root: Path) -> bool:
    """Whether ``root`` is a fusestore mount (a mountpoint named mnt-fusestore*)."""
    return root.name.startswith("mnt-fusestore")


# ------------------------------------------------------ sparse (issue 14)

IMAGE_DATA = 32  # MiB of data at the start and in the middle of the image


def _allocated_mib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / MiB


def _backing_file(root: Path, name: str) -> Path | None:
    """Where the file ``name`` of the pool at ``root`` is in the datadirs."""
    if not root.name.startswith("mnt-"):
        return root / name
    return next((d / name for d in _datadirs() if (d / name).exists()), None)


def w_sparse_image_out(root: Path, sizes: Sizes) -> float:
    """Apparent MiB/s of ``qemu-img convert -O raw`` of a mostly empty raw
    image, made and written through the target, to the scratch directory
    (outside the pool); the copy is compared with ``qemu-img compare``."""
    image = root / "sparse.raw"
    out = Path(os.environ["BENCH_SOURCE"]).with_name("sparse-out.raw")
    middle = sizes.image_mib // 2
    run("qemu-img", "create", "-q", "-f", "raw", str(image), f"{sizes.image_mib}M")
    run(
        "qemu-io", "-f", "raw",
        "-c", f"write -P 0x55 0 {IMAGE_DATA}M",
        "-c", f"write -P 0xaa {middle}M {IMAGE_DATA}M",
        str(image),
    )  # fmt: skip
    settle(image)
    try:
        seconds = timed(
            lambda: run("qemu-img", "convert", "-f", "raw", "-O", "raw", str(image), str(out))
        )
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(image), str(out))
        backing_file = _backing_file(root, image.name)
        in_datadir = _allocated_mib(backing_file) if backing_file else float("nan")
        print(
            f"    {root.name}: convert {seconds:.2f} s; allocated: image in the datadir "
            f"{in_datadir:.0f} MiB, copy {_allocated_mib(out):.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    finally:
        image.unlink()
        out.unlink(missing_ok=True)
    return sizes.image_mib / seconds


def w_duplicate(root: Path, sizes: Sizes) -> float:
    """MiB/s of ``cp`` of a dup_mib MiB file to a new name on the same target
    (coreutils' cp uses copy_file_range); the copy is compared with ``cmp``."""
    size = sizes.dup_mib * MiB
    source, copy = root / "original", root / "duplicate"
    write_file(source, size, data=_block())
    settle(source)
    try:
        seconds = timed(lambda: run("cp", str(source), str(copy)))
        settle(copy)  # its checksums, before the next target's run
        run("cmp", str(source), str(copy))
    finally:
        source.unlink()
        copy.unlink(missing_ok=True)
    return size / MiB / seconds


# ------------------------------------------------------- moves (issue 13)


def _datadirs() -> tuple[Path, Path]:
    """The two backing datadirs (priority 10 and 5), as bench_backing set them."""
    first, second = os.environ["BENCH_DATADIRS"].split(os.pathsep)
    return Path(first), Path(second)


def drain(
    mountpoint: Path, datadir: Path, on_event: Callable[[dict], object] = lambda _: None
) -> list[dict]:
    """Drain ``datadir`` of the fusestore pool at ``mountpoint``: its events,
    each with ``at`` (time.monotonic() when it arrived), up to ``done``;
    ``on_event`` sees each as it comes.

    Straight through the daemon's control socket, as ``fusestore drain``
    does (a command's start-up would count in the rate): one request line,
    then one JSON event per line. Refused: RuntimeError.
    """
    request = {"command": "drain", "datadir": str(datadir), "dry_run": False, "rate": None}
    problem: OSError | None = None
    for path in status.socket_paths(str(mountpoint)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            try:
                connection.connect(path)
            except OSError as exc:
                problem = exc
                continue
            connection.sendall(json.dumps(request).encode() + b"\n")
            events = []
            with connection.makefile("rb") as lines:
                for line in lines:
                    event = {**json.loads(line), "at": time.monotonic()}
                    events.append(event)
                    on_event(event)
                    if event["event"] == "refused":
                        raise RuntimeError(f"drain of {datadir} refused: {event.get('message')}")
                    if event["event"] == "done":
                        return events
            raise RuntimeError(f"drain of {datadir}: the daemon hung up before 'done': {events}")
    raise RuntimeError(f"no control socket of {mountpoint} answers: {problem}")


def _write_files(where: Path, names: list[str], mib: int) -> None:
    """Files of ``mib`` MiB of _block(), their checksums waited for."""
    for name in names:
        write_file(where / name, mib * MiB, data=_block())
    for name in names:
        settle(where / name)


def _check_drained(root: Path, names: list[str], mib: int, events: list[dict]) -> None:
    """Every one of ``names`` moved from the first datadir to the second, with
    its checksums (the bench stops otherwise); moves of other files (the probe's,
    removed meanwhile) may be skipped."""
    first, second = _datadirs()
    wanted = set(names)
    skipped = [e for e in events if e["event"] == "skipped" and e["name"] in wanted]
    moved = {e["name"] for e in events if e["event"] == "moved"}
    if skipped or not wanted <= moved:
        raise RuntimeError(f"drain of {first}: not moved: {skipped or sorted(wanted - moved)}")
    sha256 = _digests_of(mib * MiB)["sha256"]
    for name in names:
        if (first / name).exists() or not (second / name).is_file():
            raise RuntimeError(f"drain of {first}: {name} is not (only) in {second}")
        stored = os.getxattr(root / name, CHECKSUM_ATTRIBUTE.format("sha256")).decode()
        if stored != sha256:
            raise RuntimeError(f"{name} after its move: sha256 {stored}, hashlib says {sha256}")


def w_drain(root: Path, sizes: Sizes) -> dict[str, float]:
    """MiB/s draining the first datadir into the second (fusestore targets),
    and of ``cp`` of the same files between the two datadirs, with and without
    a ``sync`` after it (every target: the same copy, in that target's slot).

    The files are written through the mount (fusestore: so that they have
    checksums, which the move checks its copy against), or into the first
    datadir elsewhere. ``cp`` copies them into a directory of the second
    datadir (invisible in the pool), removed before the drain.
    """
    first, second = _datadirs()
    fusestore = _is_fusestore(root)
    count, mib = sizes.drain_files, sizes.drain_mib
    names = [f"drain-{i}" for i in range(count)]
    _write_files(root if fusestore else first, names, mib)
    if not all((first / name).is_file() for name in names):
        raise RuntimeError(f"the files to drain are not all in {first}: {os.listdir(first)}")
    total = count * mib
    copies = second / "bench-cp"
    rows = {}
    # One untimed copy first: this VM hands memory freed a few seconds before
    # back to its host (free page reporting), and the first copy into it then
    # paid for getting it back (on tmpfs 950 instead of 2,500 MiB/s, at times).
    for row, then_sync in (
        (None, False),
        ("cp between datadirs", False),
        ("cp between datadirs + sync", True),
    ):
        copies.mkdir()

        def copy(then_sync: bool = then_sync) -> None:
            run("cp", *(str(first / name) for name in names), str(copies))
            if then_sync:
                os.sync()

        seconds = timed(copy)
        if row is not None:
            rows[row] = total / seconds
        shutil.rmtree(copies)
    if fusestore:
        events: list[dict] = []
        seconds = timed(lambda: events.extend(drain(root, first)))
        _check_drained(root, names, mib, events)
        rows[f"drain (move) {count}\N{MULTIPLICATION SIGN}{mib} MiB files"] = total / seconds
    for name in names:
        (root / name).unlink()
    return rows


# Between two rounds of a probe: without it, two probes looping flat out on a
# 2-core machine measured their share of the CPUs more than waits (p99 1-2.6 ms
# without any drain, against 0.2 ms for one probe).
PROBE_PAUSE = 0.001


def _probe_round(root: Path, index: int, writes: bool) -> tuple[float, ...]:
    """One round of the probe's requests; the clock before, between and after."""
    clock = time.perf_counter
    fixed = f"{root}/probe-file"
    t0 = clock()
    os.stat(fixed)
    t1 = clock()
    fd = os.open(fixed, os.O_RDONLY)
    os.pread(fd, 4096, 0)
    os.close(fd)
    t2 = clock()
    if not writes:
        os.statvfs(root)  # never answered from the kernel's caches
        return t0, t1, t2, clock()
    new = f"{root}/probe-{index}"
    fd = os.open(new, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"p" * 4096)
    os.close(fd)
    t3 = clock()
    os.unlink(new)
    return t0, t1, t2, t3, clock()


def probe(root: Path, writes: bool) -> None:
    """Time requests through ``root`` in a loop, from a line on stdin until
    stdin closes, then print their latencies (JSON). Run as ``bench.py
    --probe ROOT [--probe-reads]``, in a process of its own so that the
    bench's own threads do not delay it.

    Each round: ``stat`` of ``probe-file``, ``open``/4 KiB ``pread``/``close``
    of it, then with ``writes`` a new 4 KiB file (``open O_CREAT|O_EXCL``,
    ``write``, ``close``) and its ``unlink``, else a ``statvfs``; then a pause
    of PROBE_PAUSE. One untimed round first, then it prints "ready".
    """
    kinds = ("stat", "read", "create", "unlink") if writes else ("stat", "read", "statfs")
    times: list[list[float]] = [[] for _ in kinds]
    slowest: list[tuple[float, str, float]] = []  # (seconds, kind, time.monotonic())
    stdin = sys.stdin.fileno()
    _probe_round(root, -1, writes)
    print("ready", flush=True)
    os.read(stdin, 3)  # "go\n"
    started = time.monotonic()
    rounds = 0
    while not select.select([stdin], [], [], 0)[0]:  # until stdin closes
        stamps = _probe_round(root, rounds, writes)
        now = time.monotonic()
        for index, kind in enumerate(kinds):
            took = stamps[index + 1] - stamps[index]
            times[index].append(took)
            if took > 0.005:  # when it began, comparable with the drain's events
                slowest.append((took, kind, now - (stamps[-1] - stamps[index])))
        rounds += 1
        time.sleep(PROBE_PAUSE)
    every = sorted(t for per in times for t in per)
    print(
        json.dumps(
            {
                "rounds": rounds,
                "seconds": time.monotonic() - started,
                "max_ms": every[-1] * 1e3,
                "p99_ms": every[int(0.99 * (len(every) - 1))] * 1e3,
                "max_ms_by_kind": {k: max(t) * 1e3 for k, t in zip(kinds, times, strict=True)},
                "slowest": [
                    {"ms": took * 1e3, "kind": kind, "at": at}
                    for took, kind, at in sorted(slowest, reverse=True)[:5]
                ],
            }
        )
    )


@contextlib.contextmanager
def probing(root: Path) -> Iterator[tuple[Callable[[], None], list[dict]]]:
    """Two probes of ``root`` in processes of their own, ready for the
    ``with`` block: one with creates and deletes, one that only reads (it
    shows how long a request waits behind another one, such as a create's
    ``fsync``). The function starts their loops; the list holds their figures
    after the block (``probe``'s, with ``writes``)."""
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--probe", str(root), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for extra in ([], ["--probe-reads"])
    ]
    figures: list[dict] = []
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a probe of {root} did not start")

        def go() -> None:
            for process in processes:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()

        yield go, figures
    finally:
        for process in processes:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.close()
            out = process.stdout.read()
            if process.wait() == 0:
                figures.append({**json.loads(out), "writes": process.args[-1] != "--probe-reads"})
    if len(figures) != len(processes):
        raise RuntimeError(f"a probe of {root} failed")


def _when(slow: dict, events: list[dict], began: float) -> str:
    """When a slow request of a probe began, against the drain's events."""
    marks = [e for e in events if e["event"] != "progress"]
    near = min(marks, key=lambda e: abs(e["at"] - slow["at"]))
    return (
        f"{slow['kind']} {slow['ms']:.1f} ms at {slow['at'] - began:.2f} s "
        f"({1e3 * (slow['at'] - near['at']):+.0f} ms from {near['event']} {near.get('name', '')})"
    )


def _probed(figures: list[dict]) -> str:
    """The two probes' figures, for the log line."""
    return "; ".join(
        f"{'stat/read/create/unlink' if f['writes'] else 'stat/read/statfs'}: {f['rounds']} "
        f"rounds, longest {f['max_ms']:.1f} ms, p99 {f['p99_ms']:.2f} ms"
        for f in figures
    )


def w_latency(root: Path, sizes: Sizes) -> dict[str, float]:
    """Longest and 99th-percentile request (ms; the larger of the two
    probes', see ``probing``) during a drain of large files (fusestore
    targets) and then, as long again, without one; on the other targets only
    without, for fio_seconds, as a reference."""
    first, second = _datadirs()
    fusestore = _is_fusestore(root)
    rows = {}
    # In the second datadir, where the drain does not take it from.
    fixed = (second if fusestore else root) / "probe-file"
    write_file(fixed, 4096, block=4096)
    try:
        seconds = float(sizes.fio_seconds)
        if fusestore:
            names = [f"latency-{i}" for i in range(sizes.latency_files)]
            _write_files(root, names, sizes.latency_mib)
            os.sync()
            with probing(root) as (go, during):
                # From the plan on: the probe's files land in the second
                # datadir then, so none is in the plan (and then removed).
                events = drain(root, first, lambda event: event["event"] == "plan" and go())
            began = next(event["at"] for event in events if event["event"] == "plan")
            seconds = events[-1]["at"] - began
            _check_drained(root, names, sizes.latency_mib, events)
            for name in names:
                (root / name).unlink()
            rows["longest request during a drain"] = max(f["max_ms"] for f in during)
            rows["p99 request during a drain"] = max(f["p99_ms"] for f in during)
            slowest = sorted((s for f in during for s in f["slowest"]), key=lambda s: -s["ms"])
            slow = "; ".join(_when(s, events, began) for s in slowest[:3])
            print(
                f"    {root.name}: drain {seconds:.2f} s: {_probed(during)}; slowest: {slow}",
                file=sys.stderr,
                flush=True,
            )
        os.sync()
        with probing(root) as (go, calm):
            go()
            time.sleep(seconds)
        rows["longest request without a drain"] = max(f["max_ms"] for f in calm)
        rows["p99 request without a drain"] = max(f["p99_ms"] for f in calm)
        print(
            f"    {root.name}: no drain, {seconds:.2f} s: {_probed(calm)}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        fixed.unlink()
    return rows


# name -> (function, unit); a function returning a dict gives one row per key.
WORKLOADS: dict[str, tuple[Callable[[Path, Sizes], float | dict[str, float]], str]] = {
    "seq write 1M blocks": (w_seq_write, "MiB/s"),
    "checksums ready": (w_checksums_ready, "MiB/s"),
    "seq read cold": (w_seq_read_cold, "MiB/s"),
    "seq read warm": (w_seq_read_warm, "MiB/s"),
    "4k randread 1 job": (w_randread_1, "IOPS"),
    "4k randread 4 jobs": (w_randread_4, "IOPS"),
    "4k randwrite 1 job": (w_randwrite_1, "IOPS"),
    "4k randwrite 4 jobs": (w_randwrite_4, "IOPS"),
    "4 KiB files": (w_small_files, "files/s"),
    "4 parallel writers": (w_parallel_write, "MiB/s"),
    "cp into the pool": (w_cp_in, "MiB/s"),
    "cp out of the pool": (w_cp_out, "MiB/s"),
    "drain (move)": (w_drain, "MiB/s"),
    "requests during a drain": (w_latency, "ms"),
    "sparse image out of the pool": (w_sparse_image_out, "apparent MiB/s"),
    "duplicate in the pool (cp)": (w_duplicate, "MiB/s"),
}
# Rows named otherwise than their workload: row name start -> unit.
ROW_UNITS = {
    "cp between datadirs": "MiB/s",
    "longest request": "ms",
    "p99 request": "ms",
}
# Rows given in a note under the table rather than in it.
NOTE_ROWS = ("p99 request during a drain", "p99 request without a drain")


# Workloads run more than once on each target, in the same repetition, with
# more fusestore options: row name suffix -> options. Around them the order
# alternates from one repetition to the next.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "seq write 1M blocks": {"": [], ", checksums=none": CHECKSUMS_OFF},
}
# The cost of the checksums: (row with the default checksums, row without).
CHECKSUM_COST = ("seq write 1M blocks", "seq write 1M blocks, checksums=none")


def listing_of_big_pool(
    target: str, datadirs: list[Path], scratch: Path, count: int, long: bool = False
) -> float:
    """Names per second listing a pool of ``count`` files (made directly in the
    datadirs): ``os.listdir``, or with ``long`` ``ls -l`` (a stat and, since
    fusestore answers extended attributes, a listxattr of each name)."""
    for index in range(count):
        (datadirs[index % 2] / f"many-{index:07d}").touch()
    try:
        drop_caches()
        with mounted(target, datadirs, scratch) as root:
            if long:
                seconds = timed(lambda: run("ls", "-l", str(root)))
            else:
                seconds = timed(lambda: os.listdir(root))
    finally:
        for index in range(count):
            (datadirs[index % 2] / f"many-{index:07d}").unlink()
    return count / seconds


# -------------------------------------------------------------------- scale


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale(files: int, scratch: Path) -> dict:
    """A pool of ``files`` files over 4 datadirs: mount time, listing, lookups, memory."""
    datadirs = [scratch / f"scale-{i}" for i in range(4)]
    for path in datadirs:
        path.mkdir()
        run("mount", "-t", "tmpfs", "-o", "size=256m,nr_inodes=0", "scale", str(path))
    mountpoint = scratch / "mnt-scale"
    mountpoint.mkdir()
    try:
        names = [f"image-{index:08d}" for index in range(files)]
        for index, name in enumerate(names):
            os.close(os.open(datadirs[index % 4] / name, os.O_CREAT | os.O_WRONLY, 0o644))
        direct_list = timed(lambda: [os.listdir(d) for d in datadirs])
        args = [*FUSESTORE, "mount", str(mountpoint)]
        for priority, datadir in enumerate(datadirs):
            args += ["--datadirs", f"{datadir}:{priority}"]
        mount_seconds = timed(lambda: run(*args))
        pid = int(status.read(str(mountpoint))["pid"])
        rss_mounted = rss_mib(pid)
        listed: list[str] = []
        list_seconds = timed(lambda: listed.extend(os.listdir(mountpoint)))
        rss_listed = rss_mib(pid)
        assert len(listed) == files, len(listed)
        subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
        lookup_seconds = timed(lambda: [os.stat(mountpoint / name) for name in names])
        rss_looked_up = rss_mib(pid)
        return {
            "files": files,
            "datadirs": len(datadirs),
            "mount_seconds": round(mount_seconds, 2),
            "list_seconds": round(list_seconds, 2),
            "direct_list_seconds": round(direct_list, 2),
            "lookup_seconds": round(lookup_seconds, 2),
            "lookups_per_second": round(files / lookup_seconds),
            "rss_mib_mounted": round(rss_mounted),
            "rss_mib_after_listing": round(rss_listed),
            "rss_mib_after_lookups": round(rss_looked_up),
        }
    finally:
        unmount(mountpoint)
        for path in datadirs:
            subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------- driver


# The upstream mergerfs target, if any, is added at the end by main().
TARGETS = [
    "direct",
    "fusestore",
    "fusestore-sync",
    "fusestore-devfuse",
    "fusestore-io_uring",
    "mergerfs",
    "mergerfs-cache",
]
DEBIAN_MERGERFS = ("mergerfs", "mergerfs-cache")


def upstream_mergerfs(path: Path) -> tuple[str, str]:
    """The target name of the mergerfs binary at ``path`` (``mergerfs-2.42``
    for ``mergerfs v2.42.0``) and the first line of its ``--version``."""
    try:
        first = run(str(path), "--version").stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"bench: --mergerfs {path}: no mergerfs --version: {exc}") from exc
    version = re.search(r"(\d+)\.(\d+)", first)
    if not first.startswith("mergerfs") or version is None:
        raise SystemExit(f"bench: --mergerfs {path}: not a mergerfs version: {first!r}")
    name = f"mergerfs-{version[1]}.{version[2]}"
    if name in TARGETS:
        raise SystemExit(f"bench: --mergerfs {path}: {name} is already a target")
    return name, first


def transport_choices(scratch: Path) -> dict[str, int]:
    """How often each mount of the fusestore target (the default transport,
    auto) chose what, with the reason's figures left out: e.g.
    ``{"io_uring: measured": 9}``."""
    log = scratch / "fusestore.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = [re.search(r" INFO requests through (\S+): (\w+)", line) for line in lines]
    return dict(collections.Counter(f"{m[1]}: {m[2]}" for m in found if m))


def daemon_log_problems(scratch: Path, most: int = 20) -> list[str]:
    """Warnings and errors in the fusestore daemons' logs (``--log-file`` in
    ``scratch``) but the line each drain starts with, so that a run that went
    on past a problem still shows it: up to ``most`` distinct lines, without
    time stamp and pid."""
    seen: dict[str, None] = {}
    for log in sorted(scratch.glob("fusestore*.log")):
        for line in log.read_text(errors="replace").splitlines():
            # "<time> fusestore[<pid>] <LEVEL> <message>"
            text = line.partition(" fusestore[")[2].partition("] ")[2] or line
            level = text.partition(" ")[0]
            if level not in ("WARNING", "ERROR", "CRITICAL") and "Traceback" not in line:
                continue
            if text.startswith("WARNING draining datadir "):
                continue
            seen.setdefault(f"{log.name}: {text}")
    return list(seen)[:most]


def rotated(targets: list[T], repetition: int) -> list[T]:
    """The targets in the order of this repetition: A B C, then B C A, then C A B.

    Interleaving alone leaves each target at the same place in every round,
    and a target's run is affected by the one before it (on tmpfs the run
    after a 1 GiB file was freed was reproducibly slower); rotating puts every
    target at every place.
    """
    shift = repetition % len(targets)
    return [*targets[shift:], *targets[:shift]]


def bench_backing(kind: str, sizes: Sizes, scratch: Path, only: list[str] | None) -> dict:
    results: dict[str, dict[str, list[float]]] = {}
    backing_mib = max(3 * sizes.seq_mib, 5 * sizes.parallel_mib, 512) + 256
    with backing(kind, scratch, backing_mib) as datadirs:
        os.environ["BENCH_DATADIRS"] = os.pathsep.join(str(d) for d in datadirs)
        for workload, (function, _) in WORKLOADS.items():
            if only and not any(word in workload for word in only):
                continue
            if workload == "seq read cold" and kind == "tmpfs":
                continue  # tmpfs has no cold cache
            variants = list(VARIANTS.get(workload, {"": []}).items())
            for repetition in range(sizes.repetitions):
                for target in rotated(TARGETS, repetition):
                    for suffix, options in rotated(variants, repetition):
                        with mounted(target, datadirs, scratch, options) as root:
                            measured = function(root, sizes)
                        rows = measured if isinstance(measured, dict) else {workload: measured}
                        for row, value in rows.items():
                            per = results.setdefault(row + suffix, {t: [] for t in TARGETS})
                            per[target].append(value)
            print(f"  {kind}: {workload} done", file=sys.stderr, flush=True)
        listings = {
            f"listing a {sizes.listing_files:,}-file pool": False,
            f"ls -l of a {sizes.listing_files:,}-file pool": True,
        }
        for name, long in listings.items():
            wanted = ("list", "ls") if long else ("list",)
            if only and not any(w in word for word in only for w in wanted):
                continue
            results[name] = {t: [] for t in TARGETS}
            for repetition in range(max(1, sizes.repetitions // 2)):
                for target in rotated(TARGETS, repetition):
                    results[name][target].append(
                        listing_of_big_pool(target, datadirs, scratch, sizes.listing_files, long)
                    )
            print(f"  {kind}: {name} done", file=sys.stderr, flush=True)
    # None: a row the target has no figure for (a drain outside fusestore).
    return {
        workload: {
            target: statistics.median(values) if values else None for target, values in per.items()
        }
        for workload, per in results.items()
    }


def unit_of(row: str) -> str:
    for start, unit in ROW_UNITS.items():
        if row.startswith(start):
            return unit
    for workload, (_, unit) in WORKLOADS.items():
        if row.startswith(workload):
            return unit
    return "names/s"


def checksum_cost(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """fusestore's sequential write with its default checksums over the same
    without (``checksums=none``), per fusestore target (issue 12: at least 0.8)."""
    on, off = CHECKSUM_COST
    if on not in results or off not in results:
        return {}
    return {
        target: round(results[on][target] / results[off][target], 3)
        for target in TARGETS
        if target.startswith("fusestore")
    }


def move_cost(results: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Per fusestore target, the drain's MiB/s over ``cp``'s between the same
    datadirs, plain and with a ``sync`` after it (issue 13: at least 0.8).

    ``cp`` is the same copy whatever the target, measured in every target's
    slot: the ratio takes the median over all of them, as one slot's figure
    swings on this VM (1,077 against 2,200-2,360 MiB/s in the others, once).
    """
    drained = next((row for row in results if row.startswith("drain (move)")), None)
    if drained is None:
        return {}
    copied = {
        row: statistics.median(v for v in results[row].values() if v is not None)
        for row in ("cp between datadirs", "cp between datadirs + sync")
    }
    return {
        target: {row: round(moved / rate, 3) for row, rate in copied.items()}
        for target in TARGETS
        if target.startswith("fusestore") and (moved := results[drained][target]) is not None
    }


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.1f}" if unit == "ms" else f"{value:,.0f}"


def _ratio(fs: float | None, other: float | None, unit: str) -> str:
    """fusestore over another target; none for latencies (lower is better)
    and rows without a figure."""
    if unit == "ms" or not fs or not other:
        return "—"
    return f"{fs / other:.2f}"


def markdown(report: dict) -> str:
    """The tables: a column per target, then fusestore (--no-sync, io_uring)
    over the direct disk (the physical limit), over upstream mergerfs (with
    --mergerfs) and over the better of Debian's two mergerfs targets."""
    targets = report["targets"]
    upstream = (report["mergerfs_upstream"] or {}).get("target")
    ratio_names = ["fs/direct", *([f"fs/{upstream}"] if upstream else [])]
    ratio_names.append("fs/best Debian mergerfs")
    lines = []
    if not upstream:
        lines.append(
            "\nNo upstream mergerfs: its column is left out (`--mergerfs PATH` adds it, "
            "see `scripts/bench --help`)."
        )
    for kind, rows in report["results"].items():
        lines.append(f"\n### {kind} backing (medians of {report['repetitions']} runs)\n")
        lines.append(f"| workload | unit | {' | '.join(targets + ratio_names)} |")
        lines.append("|---|---|" + "--:|" * (len(targets) + len(ratio_names)))
        for workload, medians in rows.items():
            if workload in NOTE_ROWS:
                continue
            unit = unit_of(workload)
            cells = " | ".join(_cell(medians.get(t), unit) for t in targets)
            fs = medians.get("fusestore")
            debian = [v for t in DEBIAN_MERGERFS if (v := medians.get(t))]
            ratios = [_ratio(fs, medians.get("direct"), unit)]
            if upstream:
                ratios.append(_ratio(fs, medians.get(upstream), unit))
            ratios.append(_ratio(fs, max(debian, default=None), unit))
            lines.append(f"| {workload} | {unit} | {cells} | {' | '.join(ratios)} |")
        if cost := report["checksum_cost"].get(kind):
            ratios = ", ".join(f"{target} {ratio:.2f}" for target, ratio in cost.items())
            lines.append(
                f"\nseq write with checksums {','.join(CHECKSUMS)} / with checksums=none "
                f"(target: at least 0.80): {ratios}"
            )
        if cost := report["move_cost"].get(kind):
            ratios = ", ".join(
                f"{target} {r['cp between datadirs']:.2f}"
                + (
                    f" ({r['cp between datadirs + sync']:.2f} against cp + sync)"
                    if kind != "tmpfs"
                    else ""
                )
                for target, r in cost.items()
            )
            lines.append(
                "\ndrain / cp between the same datadirs (cp: its median over all the targets' "
                f"slots; target: at least 0.80): {ratios}"
            )
        if "p99 request during a drain" in rows:
            during, calm = rows["p99 request during a drain"], rows["p99 request without a drain"]
            p99 = ", ".join(
                f"{t} {during[t]:.2f} / {calm[t]:.2f}"
                if during[t] is not None
                else f"{t} — / {calm[t]:.2f}"
                for t in targets
            )
            lines.append(
                "\n99th percentile of the requests (the larger of the two probes') during a "
                f"drain / without, ms: {p99}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=UPSTREAM_BUILD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--repetitions", type=int, help="runs per workload and target")
    parser.add_argument(
        "--backing",
        choices=["tmpfs", "ext4", "both"],
        help="backing filesystem of the datadirs (default: both; tmpfs with --quick)",
    )
    parser.add_argument("--only", action="append", help="run workloads whose name has WORD")
    parser.add_argument(
        "--mergerfs",
        metavar="PATH",
        help="an upstream mergerfs binary to run beside Debian's, as the target mergerfs-X.Y "
        "(from its --version) with FUSE passthrough (root, Linux 6.9+); without it that "
        "column is left out, with a note. How to build one: below",
    )
    parser.add_argument(
        "--scale",
        type=int,
        nargs="?",
        const=1_000_000,
        metavar="FILES",
        help="instead: mount a pool of FILES (default 1,000,000) files over 4 datadirs and "
        "report mount time, listing, lookups and the daemon's memory",
    )
    parser.add_argument("--probe", metavar="ROOT", help=argparse.SUPPRESS)  # w_latency's
    parser.add_argument("--probe-reads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(Path(args.probe), writes=not args.probe_reads)
        return 0
    if args.scale:
        with tempfile.TemporaryDirectory(prefix="fusestore-scale-", dir="/var/tmp") as tmp:
            print(json.dumps(scale(args.scale, Path(tmp)), indent=2))
        return 0
    upstream = None
    if args.mergerfs:
        # scripts/bench runs this from the repository: a relative PATH is the caller's.
        binary = Path(os.environ.get("BENCH_CWD", os.getcwd()), args.mergerfs).resolve()
        name, version = upstream_mergerfs(binary)
        UPSTREAM[name] = binary
        TARGETS.append(name)
        upstream = {
            "target": name,
            "version": version,
            "path": str(binary),
            "options": ["category.create=ff", f"minfreespace={RESERVE}", *UPSTREAM_OPTIONS],
        }
    sizes = QUICK if args.quick else FULL
    if args.repetitions:
        sizes.repetitions = args.repetitions
    backing_kind = args.backing or ("tmpfs" if args.quick else "both")
    kinds = ["tmpfs", "ext4"] if backing_kind == "both" else [backing_kind]
    with tempfile.TemporaryDirectory(prefix="fusestore-bench-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        source = scratch / "source.img"
        write_file(source, sizes.seq_mib * MiB)
        os.sync()  # its writeback would otherwise slow down the first runs
        os.environ["BENCH_SOURCE"] = str(source)
        results = {kind: bench_backing(kind, sizes, scratch, args.only) for kind in kinds}
        problems = daemon_log_problems(scratch)
        choices = transport_choices(scratch)
    for line in problems:
        print(f"  daemon log: {line}", file=sys.stderr)
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "mergerfs": run("mergerfs", "--version").stdout.split("\n")[0].strip()
        if shutil.which("mergerfs")
        else None,
        "mergerfs_upstream": upstream,
        "targets": TARGETS,
        "repetitions": sizes.repetitions,
        "quick": args.quick,
        "results": results,
        "checksum_cost": {kind: checksum_cost(rows) for kind, rows in results.items()},
        "move_cost": {kind: move_cost(rows) for kind, rows in results.items()},
        "daemon_log_problems": problems,
        "transport_choices": choices,
    }
    heading = f"{report['machine']}; Debian's {report['mergerfs']}"
    heading += "; fusestore's transport at its mounts: " + (
        ", ".join(f"{what} x{count}" for what, count in choices.items()) or "?"
    )
    if upstream:
        heading += f"; {upstream['target']}: {upstream['version']} ({upstream['path']})"
    print(json.dumps(report, indent=2) if args.json else heading + markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
