"""Side-by-side benchmark: the datadir directly, fusestore, and mergerfs.

Run through ``scripts/bench`` (which installs mergerfs and fio). Every
workload runs on every target in turn, repetition by repetition (A B C A B C
…), so drift of the machine hits all targets alike; the table shows medians
and the ratios fusestore/direct and fusestore/best mergerfs (higher is better
for fusestore: every figure is a rate).

Targets, over the same backing datadirs (two of them, priorities 10 and 5):
  direct         the first datadir itself
  fusestore      fusestore --no-sync (mergerfs does not fsync on close either)
  fusestore-sync fusestore with its durable default (fsync before publishing)
  mergerfs       category.create=epmfs, minfreespace = fusestore's reserve
  mergerfs-cache the same plus cache.files=auto-full, writeback, attr/entry caching
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
RESERVE = "64M"
REPO = Path(__file__).resolve().parent.parent
FUSESTORE = [sys.executable, "-m", "fusestore"]


@dataclass
class Sizes:
    seq_mib: int
    fio_mib: int
    fio_seconds: int
    small_files: int
    listing_files: int
    parallel_mib: int
    repetitions: int


FULL = Sizes(1024, 256, 5, 10_000, 100_000, 256, 5)
QUICK = Sizes(256, 64, 2, 2_000, 20_000, 64, 3)


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


@contextlib.contextmanager
def mounted(name: str, datadirs: list[Path], scratch: Path) -> Iterator[Path]:
    if name == "direct":
        yield datadirs[0]
        return
    mountpoint = scratch / f"mnt-{name}"
    mountpoint.mkdir(exist_ok=True)
    if name.startswith("fusestore"):
        args = [*FUSESTORE, "mount", "--min-free-space", RESERVE]
        args += ["--datadirs", f"{datadirs[0]}:10", "--datadirs", f"{datadirs[1]}:5"]
        if name == "fusestore":
            args.append("--no-sync")
        args += ["--log-file", str(scratch / f"{name}.log"), str(mountpoint)]
        run(*args)
    else:
        options = ["category.create=epmfs", f"minfreespace={RESERVE}", "fsname=mergerfs"]
        if name == "mergerfs-cache":
            options += [
                "cache.files=auto-full",
                "cache.writeback=true",
                "cache.attr=1",
                "cache.entry=1",
                "cache.negative_entry=1",
            ]
        branches = ":".join(str(d) for d in datadirs)
        run("mergerfs", "-o", ",".join(options), branches, str(mountpoint))
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------- workloads


def write_file(path: Path, size: int, block: int = MiB) -> None:
    data = os.urandom(block)
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


def timed(action: Callable[[], object]) -> float:
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


def _small_files(root: Path, sizes: Sizes, phase: str) -> float:
    names = [root / f"small-{i:06d}" for i in range(sizes.small_files)]
    data = b"x" * 4096
    timings = {}

    def create() -> None:
        for path in names:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)

    timings["create"] = timed(create)
    timings["stat"] = timed(lambda: [os.stat(p) for p in names])
    timings["list"] = timed(lambda: os.listdir(root))
    timings["delete"] = timed(lambda: [os.unlink(p) for p in names])
    return sizes.small_files / timings[phase]


def w_small_create(root: Path, sizes: Sizes) -> float:
    return _small_files(root, sizes, "create")


def w_small_stat(root: Path, sizes: Sizes) -> float:
    return _small_files(root, sizes, "stat")


def w_small_list(root: Path, sizes: Sizes) -> float:
    return _small_files(root, sizes, "list")


def w_small_delete(root: Path, sizes: Sizes) -> float:
    return _small_files(root, sizes, "delete")


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
    out = source.with_name("copied-out")
    seconds = timed(lambda: run("cp", str(root / "copied"), str(out)))
    (root / "copied").unlink()
    out.unlink()
    return source.stat().st_size / MiB / seconds


WORKLOADS: dict[str, tuple[Callable[[Path, Sizes], float], str]] = {
    "seq write 1M blocks": (w_seq_write, "MiB/s"),
    "seq read cold": (w_seq_read_cold, "MiB/s"),
    "seq read warm": (w_seq_read_warm, "MiB/s"),
    "4k randread 1 job": (w_randread_1, "IOPS"),
    "4k randread 4 jobs": (w_randread_4, "IOPS"),
    "4k randwrite 1 job": (w_randwrite_1, "IOPS"),
    "4k randwrite 4 jobs": (w_randwrite_4, "IOPS"),
    "4 KiB files: create": (w_small_create, "files/s"),
    "4 KiB files: stat": (w_small_stat, "files/s"),
    "4 KiB files: list": (w_small_list, "files/s"),
    "4 KiB files: delete": (w_small_delete, "files/s"),
    "4 parallel writers": (w_parallel_write, "MiB/s"),
    "cp into the pool": (w_cp_in, "MiB/s"),
    "cp out of the pool": (w_cp_out, "MiB/s"),
}


def listing_of_big_pool(target: str, datadirs: list[Path], scratch: Path, count: int) -> float:
    """Names per second listing a pool of ``count`` files (made directly in the datadirs)."""
    for index in range(count):
        (datadirs[index % 2] / f"many-{index:07d}").touch()
    try:
        drop_caches()
        with mounted(target, datadirs, scratch) as root:
            seconds = timed(lambda: os.listdir(root))
    finally:
        for index in range(count):
            (datadirs[index % 2] / f"many-{index:07d}").unlink()
    return count / seconds


# ------------------------------------------------------------------- driver


TARGETS = ["direct", "fusestore", "fusestore-sync", "mergerfs", "mergerfs-cache"]


def bench_backing(kind: str, sizes: Sizes, scratch: Path, only: list[str] | None) -> dict:
    results: dict[str, dict[str, list[float]]] = {}
    backing_mib = max(3 * sizes.seq_mib, 5 * sizes.parallel_mib, 512) + 256
    with backing(kind, scratch, backing_mib) as datadirs:
        for workload, (function, _) in WORKLOADS.items():
            if only and not any(word in workload for word in only):
                continue
            if workload == "seq read cold" and kind == "tmpfs":
                continue  # tmpfs has no cold cache
            per_target = results.setdefault(workload, {t: [] for t in TARGETS})
            for _ in range(sizes.repetitions):
                for target in TARGETS:
                    with mounted(target, datadirs, scratch) as root:
                        per_target[target].append(function(root, sizes))
            print(f"  {kind}: {workload} done", file=sys.stderr, flush=True)
        if not only or any("list" in word for word in only):
            name = f"listing a {sizes.listing_files:,}-file pool"
            results[name] = {t: [] for t in TARGETS}
            for _ in range(max(1, sizes.repetitions // 2)):
                for target in TARGETS:
                    results[name][target].append(
                        listing_of_big_pool(target, datadirs, scratch, sizes.listing_files)
                    )
            print(f"  {kind}: {name} done", file=sys.stderr, flush=True)
    return {
        workload: {target: statistics.median(values) for target, values in per.items()}
        for workload, per in results.items()
    }


def unit_of(workload: str) -> str:
    return WORKLOADS.get(workload, (None, "names/s"))[1]


def markdown(report: dict) -> str:
    lines = []
    for kind, rows in report["results"].items():
        lines.append(f"\n### {kind} backing (medians of {report['repetitions']} runs)\n")
        lines.append(
            "| workload | unit | direct | fusestore | fusestore-sync | mergerfs | mergerfs-cache "
            "| fs/direct | fs/best mergerfs |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for workload, medians in rows.items():
            best_mergerfs = max(medians["mergerfs"], medians["mergerfs-cache"])
            fs = medians["fusestore"]
            cells = " | ".join(f"{medians[t]:,.0f}" for t in TARGETS)
            lines.append(
                f"| {workload} | {unit_of(workload)} | {cells} | {fs / medians['direct']:.2f} "
                f"| {fs / best_mergerfs:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--repetitions", type=int, help="runs per workload and target")
    parser.add_argument("--backing", choices=["tmpfs", "ext4", "both"], default="both")
    parser.add_argument("--only", action="append", help="run workloads whose name has WORD")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.repetitions:
        sizes.repetitions = args.repetitions
    kinds = ["tmpfs", "ext4"] if args.backing == "both" else [args.backing]
    with tempfile.TemporaryDirectory(prefix="fusestore-bench-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        source = scratch / "source.img"
        write_file(source, sizes.seq_mib * MiB)
        os.environ["BENCH_SOURCE"] = str(source)
        results = {kind: bench_backing(kind, sizes, scratch, args.only) for kind in kinds}
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "mergerfs": run("mergerfs", "--version").stdout.split("\n")[0].strip()
        if shutil.which("mergerfs")
        else None,
        "repetitions": sizes.repetitions,
        "quick": args.quick,
        "results": results,
    }
    print(
        json.dumps(report, indent=2)
        if args.json
        else f"{report['machine']}; {report['mergerfs']}" + markdown(report)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
