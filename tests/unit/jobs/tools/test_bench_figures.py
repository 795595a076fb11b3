"""`jobs.tools.bench.figures`: medians, percentiles and ratios, and the readings of /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.tools.bench import figures

# A real /proc/PID/stat line, the command name holding a space and parentheses.
STAT = (
    "4418 (celery (worker) x) S 1 4418 4418 0 -1 4194560 51234 0 12 0 "
    "731 208 0 0 20 0 3 0 123456 98765432 12345 18446744073709551615"
)
STATUS = """Name:\tcelery
VmPeak:\t  400000 kB
VmSize:\t  380000 kB
VmHWM:\t   98304 kB
VmRSS:\t   90000 kB
Threads:\t3
"""


# --- median, percentile, ratio --------------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value() -> None:
    assert figures.median([3.0, 1.0, 2.0]) == 2.0


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert figures.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_median_skips_unknown_values_and_is_unknown_without_any() -> None:
    assert figures.median([None, 5.0, None]) == 5.0
    assert figures.median([None, None]) is None
    assert figures.median([]) is None


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50))
def test_median_lies_between_the_extremes(values: list[float]) -> None:
    middle = figures.median(values)

    assert middle is not None
    assert min(values) <= middle <= max(values)


def test_percentile_interpolates_like_percentile_cont() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]

    assert figures.percentile(values, 0.5) == 3.0
    assert figures.percentile(values, 0.95) == pytest.approx(4.8)
    assert figures.percentile(values, 0.0) == 1.0
    assert figures.percentile(values, 1.0) == 5.0


def test_percentile_of_nothing_is_unknown_and_a_bad_fraction_is_refused() -> None:
    assert figures.percentile([], 0.5) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        figures.percentile([1.0], 1.5)


def test_ratio_and_per_order_are_unknown_when_an_operand_is() -> None:
    assert figures.ratio(3.0, 2.0) == 1.5
    assert figures.ratio(None, 2.0) is None
    assert figures.ratio(3.0, None) is None
    assert figures.ratio(3.0, 0.0) is None
    assert figures.per_order(10.0, 4) == 2.5
    assert figures.per_order(None, 4) is None
    assert figures.per_order(10.0, 0) is None


# --- /proc --------------------------------------------------------------------------------


def test_cpu_ticks_adds_utime_and_stime_after_a_tricky_command_name() -> None:
    assert figures.cpu_ticks(STAT) == 731 + 208


def test_peak_rss_reads_vmhwm_in_kib() -> None:
    assert figures.peak_rss_kib(STATUS) == 98304
    assert figures.peak_rss_kib("Name:\tkthreadd\nState:\tS\n") is None


def test_this_process_is_read_from_proc() -> None:
    # Given this test's own process group (pytest leads it or belongs to one)
    group = os.getpgid(0)

    # Then it is found, with some CPU spent and some memory
    assert os.getpid() in figures.group_members(group)
    assert figures.group_cpu_seconds(group) > 0
    peak = figures.group_peak_rss_mib(group)
    assert peak is not None
    assert peak > 1
    assert figures.cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text()) > 0
