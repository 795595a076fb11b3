"""`Sleep` and `WaitForSignal`: when a waiting job wakes, from a duration, a field of its
context or of a result, or a function; the signal key a wait takes; the declarations refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobs import Sleep, WaitForSignal
from ledger import SignalWait

NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_duration_is_a_delay_the_ledger_adds_to_its_clock() -> None:
    assert Sleep("nap", seconds=90).due({}, {}) == timedelta(seconds=90)


def test_until_a_field_of_the_context_or_of_a_result() -> None:
    paris = NOON.astimezone(timezone(timedelta(hours=1))).isoformat()
    assert Sleep("nap", until="at").due({"at": paris}, {}) == NOON
    assert Sleep("nap", until="gather.at").due({}, {"gather": {"at": paris}}) == NOON


def test_until_a_function_of_the_job() -> None:
    sleep: Sleep[None] = Sleep("nap", until=lambda context, results: NOON + timedelta(days=1))
    assert sleep.due({}, {}) == NOON + timedelta(days=1)


@pytest.mark.parametrize(
    ("until", "context", "error"),
    [
        ("at", {}, "holds no time"),
        ("at", {"at": "soon"}, "not an ISO 8601 time"),
        ("at", {"at": "2026-03-01T12:00:00"}, "no UTC offset"),
        ("gather.at", {}, "holds no time"),
    ],
)
def test_an_until_that_is_no_time_is_refused_by_name(
    until: str, context: dict[str, str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Sleep("nap", until=until).due(context, {})


def test_a_naive_time_from_a_function_is_refused() -> None:
    with pytest.raises(ValueError, match="not an aware datetime"):
        Sleep("nap", until=lambda context, results: datetime(2026, 3, 1)).due({}, {})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "give seconds or until"),
        ({"seconds": 1, "until": "at"}, "give seconds or until"),
        ({"seconds": -1}, "0 or more"),
        ({"seconds": float("nan")}, "0 or more"),
        ({"until": ""}, "names no field"),
    ],
)
def test_a_sleep_without_one_clear_wait_is_refused(options: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Sleep("nap", **options)  # type: ignore[arg-type]


def test_a_wait_for_a_signal_times_out_after_seconds_or_when_a_function_says() -> None:
    wait: WaitForSignal[None] = WaitForSignal("w", signal="shipped", key="{order}", timeout=90)
    assert wait.due({}, {}) == timedelta(seconds=90)
    later: WaitForSignal[None] = WaitForSignal(
        "w", signal="shipped", key="{order}", timeout=lambda c, r: NOON
    )
    assert later.due({}, {}) == NOON
    counted: WaitForSignal[None] = WaitForSignal(
        "w", signal="shipped", key="{order}", timeout=lambda c, r: 5
    )
    assert counted.due({}, {}) == timedelta(seconds=5)


def test_a_wait_for_a_signal_takes_its_key_from_the_context() -> None:
    wait: WaitForSignal[None] = WaitForSignal("w", signal="shipped", key="{order}", timeout=1)
    assert wait.signal_wait({"order": "o-1"}, "next") == SignalWait("shipped", "o-1", "next")
    by_function: WaitForSignal[None] = WaitForSignal(
        "w", signal="s", key=lambda c: f"x-{c['n']}", timeout=1
    )
    assert by_function.signal_wait({"n": 3}, None) == SignalWait("s", "x-3", None)
    # Its own key in the plan is not the signal's key: a wait claims none.
    assert wait.key_for({"order": "o-1"}).startswith("signal:w:")
    with pytest.raises(ValueError, match="needs context fields"):
        wait.signal_wait({}, None)
    with pytest.raises(ValueError, match="not 1 to 300 characters"):
        WaitForSignal("w", signal="s", key=lambda c: "", timeout=1).signal_wait({}, None)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (lambda c, r: "soon", "not seconds"),
        (lambda c, r: -1, "-1 seconds"),
        (lambda c, r: datetime(2026, 3, 1), "no UTC offset"),
    ],
)
def test_a_timeout_function_that_gives_no_time_is_refused(timeout: object, error: str) -> None:
    wait: WaitForSignal[None] = WaitForSignal("w", signal="s", key="k", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=error):
        wait.due({}, {})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"signal": "a b", "key": "k", "timeout": 1}, "signal name"),
        ({"signal": "s", "key": "k", "timeout": -1}, "0 or more"),
        ({"signal": "s", "key": "k", "timeout": float("inf")}, "0 or more"),
    ],
)
def test_a_wait_for_a_signal_declared_wrong_is_refused(
    options: dict[str, object], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        WaitForSignal("w", **options)  # type: ignore[arg-type]
