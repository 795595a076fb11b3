"""The bench's arithmetic and its readings of /proc: medians, percentiles and ratios; a process
group's CPU time and peak resident memory."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from jobs.tools import processes

#: Kernel clock ticks per second: the unit of utime and stime in /proc/PID/stat.
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def median(values: Sequence[float | None]) -> float | None:
    """The median of the known values (None are skipped); None when none is known."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    middle = len(known) // 2
    if len(known) % 2:
        return known[middle]
    return (known[middle - 1] + known[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` percentile of `values`, interpolated between neighbours (like Postgres'
    percentile_cont); None for no values."""
    if not values:
        return None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not between 0 and 1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(value: float | None, base: float | None) -> float | None:
    """`value / base`, None when either is unknown or the base is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def per_order(total: float | None, orders: int) -> float | None:
    """`total` spread over `orders`; None when unknown."""
    if total is None or orders <= 0:
        return None
    return total / orders


def cpu_ticks(stat: str) -> int:
    """utime + stime from the text of /proc/PID/stat, in clock ticks.

    The command name (second field) may hold spaces and parentheses: fields are counted after
    its last ')'.
    """
    fields = stat.rsplit(")", 1)[1].split()
    # After the name: state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt,
    # majflt, cmajflt, utime, stime.
    return int(fields[11]) + int(fields[12])


def peak_rss_kib(status: str) -> int | None:
    """VmHWM (the peak resident set size) in KiB from the text of /proc/PID/status; None for
    a process without one (a zombie, a kernel thread)."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (a worker's main process and its pool children)."""
    return [pid for pid, (_, group) in processes.process_table().items() if group == pgid]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds spent so far by the live processes of a group."""
    ticks = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ticks += cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    return ticks / CLOCK_TICKS


def group_peak_rss_mib(pgid: int) -> float | None:
    """The sum of the peak resident memory of the live processes of a group, in MiB."""
    total = 0
    found = False
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            peak = peak_rss_kib(Path(f"/proc/{pid}/status").read_text())
            if peak is not None:
                total += peak
                found = True
    return total / 1024 if found else None
