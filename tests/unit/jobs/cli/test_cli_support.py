"""Parsing of durations and ids on the command line."""

from __future__ import annotations

import pytest

from jobs.cli.support import BadInput, parse_duration, parse_job_id, who


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 5400),
        ("12h", 43_200),
        ("30d", 2_592_000),
        ("2w", 1_209_600),
        ("1.5h", 5400),
        (" 7D ", 604_800),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, name="--older-than") == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "thirty days", "-1d", "1y", "1d2h"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(BadInput, match=r"^--older-than: expected a duration"):
        parse_duration(text, name="--older-than")


def test_job_ids() -> None:
    assert (
        str(parse_job_id("7d1e0a44-9a1c-4d5e-8f2e-0c9f5b7a1d23"))
        == "7d1e0a44-9a1c-4d5e-8f2e-0c9f5b7a1d23"
    )
    with pytest.raises(BadInput, match=r"^JOB_ID: not a job id: 'nope'$"):
        parse_job_id("nope")


def test_who_prefers_the_given_name() -> None:
    assert who(" alice ") == "alice"
    assert who(None)
