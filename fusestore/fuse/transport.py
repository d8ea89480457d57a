"""Which transport carries the kernel's requests: the ``transport`` setting.

``devfuse``: one thread reads ``/dev/fuse`` (busy polling between requests).
``io_uring``: FUSE over io_uring, a queue per CPU answered on that CPU
(``uring.py``), where the kernel has it. ``auto``, the default: whichever
answered small requests faster on this machine, measured at mount time
(``probe.py``), because neither is faster everywhere — io_uring saves the
cross-CPU wake-ups that make a virtual machine's round trip slow, but puts
the daemon's Python on the very CPU of the program that asks, where it
competes with that program and whatever else runs there (docs/design.md,
*Choices*). One cannot switch later: once the io_uring queues are
registered the mount stays on them, so the choice is made before mounting.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fusestore.fuse import probe, uring

log = logging.getLogger(__name__)

# io_uring is kept unless /dev/fuse was faster by more than this. Probes of
# one transport back to back on the project's quiet 2-vCPU VM differ by up
# to ~15% (66-75 k, 26-31 k stats/s; docs/performance.md), so a smaller
# lead says little, while the differences that matter are 2-3x (that VM
# quiet, the filer's machine). On a near-tie io_uring spends less CPU (no
# busy polling) and answers several programs on several CPUs at once,
# where /dev/fuse has one thread.
NOISE = 0.10

# Rounds per transport; the best counts: the others met a busier machine.
ROUNDS = 3

NAMES = {True: "io_uring", False: "/dev/fuse"}


@dataclass(frozen=True)
class Choice:
    """The transport to mount with, and why."""

    io_uring: bool
    setting: str  # auto, io_uring or devfuse
    why: str  # set, measured, no io_uring, probe failed
    reason: str  # the why in words, for the log and status
    # stats per second through each ("io_uring", "devfuse"), when measured
    rates: dict[str, int] | None = None
    probe_seconds: float | None = None

    @property
    def name(self) -> str:
        return "io_uring" if self.io_uring else "devfuse"

    def facts(self) -> dict[str, Any]:
        """What ``fusestore status --json`` shows as ``transport``."""
        return {
            "chosen": self.name,
            "setting": self.setting,
            "why": self.why,
            "reason": self.reason,
            "stats_per_second": self.rates,
            "probe_seconds": self.probe_seconds,
        }


def choose(setting: str, busy_poll_us: int, root_stat: Callable[[], os.stat_result]) -> Choice:
    """The transport for ``setting``; with ``auto``, probed with the loop's
    ``busy_poll_us`` and requests that cost ``root_stat``. Logs the choice."""
    choice = _choose(setting, busy_poll_us, root_stat)
    log.info("requests through %s: %s", NAMES[choice.io_uring], choice.reason)
    return choice


def _choose(setting: str, busy_poll_us: int, root_stat: Callable[[], os.stat_result]) -> Choice:
    if setting == "devfuse":
        return Choice(False, setting, "set", "transport = devfuse (set)")
    # Before mounting: the kernel offers io_uring at INIT only if switched on.
    available = uring.switch_on()
    if setting == "io_uring":
        if available:
            return Choice(True, setting, "set", "transport = io_uring (set)")
        reason = "transport = io_uring (set), but this kernel has no FUSE over io_uring"
        log.warning("%s: requests go through /dev/fuse", reason)
        return Choice(False, setting, "no io_uring", reason)
    if not available:
        return Choice(False, setting, "no io_uring", "this kernel has no FUSE over io_uring")
    started = time.monotonic()
    try:
        rates = _measure(busy_poll_us, root_stat)
    except Exception as exc:  # whatever it was, the pool must still mount
        what = str(exc) if isinstance(exc, probe.ProbeError) else repr(exc)
        reason = f"the transport probe failed ({what}); /dev/fuse works on every kernel"
        log.warning("%s", reason)
        return Choice(False, setting, "probe failed", reason)
    return decide(rates, time.monotonic() - started)


def _measure(busy_poll_us: int, root_stat: Callable[[], os.stat_result]) -> dict[str, float]:
    """The best of :data:`ROUNDS` rounds through each transport, taken in
    turns: a load that comes or goes during the probe then weighs on both."""
    rates: dict[str, list[float]] = {"io_uring": [], "devfuse": []}
    for _ in range(ROUNDS):
        for io_uring in (True, False):
            rate = probe.stats_per_second(io_uring, busy_poll_us, root_stat)
            rates["io_uring" if io_uring else "devfuse"].append(rate)
    return {name: max(figures) for name, figures in rates.items()}


def decide(rates: dict[str, float], probe_seconds: float = 0.0) -> Choice:
    """io_uring unless /dev/fuse answered more than ``NOISE`` faster."""
    io_uring = rates["io_uring"] >= rates["devfuse"] * (1 - NOISE)
    rounded = {name: round(rate) for name, rate in rates.items()}
    chosen, other = ("io_uring", "devfuse") if io_uring else ("devfuse", "io_uring")
    reason = (
        f"measured {rounded[chosen]:,} stats/s vs {rounded[other]:,} through "
        f"{NAMES[not io_uring]} at mount"
    )
    if io_uring and rates["io_uring"] < rates["devfuse"]:
        reason += f", within the {NOISE:.0%} noise margin, where io_uring is kept"
    reason += f" (probe {probe_seconds:.2f} s)"
    return Choice(io_uring, "auto", "measured", reason, rounded, round(probe_seconds, 3))
