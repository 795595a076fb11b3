"""`Sleep`: when a sleeping job wakes, from a duration, a field of its context or of a
result, or a function; and the declarations refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobs import Sleep

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
