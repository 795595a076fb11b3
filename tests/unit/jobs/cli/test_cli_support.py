"""Parsing of durations and ids on the command line, and showing them to people."""

from __future__ import annotations

import uuid

import pytest
from rich.console import Console
from rich.table import Table

from jobs.cli import support
from jobs.cli.support import BadInput, human_duration, parse_duration, parse_job_id, who


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


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0 ms"),
        (0.0124, "12 ms"),
        (0.9996, "1.0 s"),
        (1.234, "1.2 s"),
        (59.94, "59.9 s"),
        (59.96, "1 min 0 s"),
        (184.4, "3 min 4 s"),
        (3599.6, "1 h 0 min"),
        (7_500, "2 h 5 min"),
        (273_600, "3 d 4 h"),
    ],
)
def test_human_durations(seconds: float, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_a_table_keeps_its_ids_whole_on_a_narrow_console(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a console 30 characters wide (a pipe, a small terminal)
    monkeypatch.setattr(support, "stdout", Console(width=30, soft_wrap=True))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    table = Table("job", "pipeline", "state")
    for job_id in ids:
        table.add_row(job_id, "order-placed", "dead_lettered")

    # When the table is printed
    support.print_table(table)

    # Then every id is on one line, whole
    text = capsys.readouterr().out
    for job_id in ids:
        assert job_id in text
    assert "…" not in text
