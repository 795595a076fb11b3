"""What the `oncelery` commands share: the consoles, tables and JSON output, the bad-input
error, and parsing of ids and durations (and showing them to people)."""

from __future__ import annotations

import getpass
import json
import re
import sys
from typing import Annotated, Final
from uuid import UUID

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from config import Settings
from jobs.engine.runtime import load_pipelines
from jobs.errors import UnknownPipeline
from jobs.pipelines import Pipeline, registry
from ledger import JobStore, create_engine

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ByOption = Annotated[
    str | None, typer.Option("--by", help="Who does this, for the history (default: your login).")
]

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: Wider than any table we print: what a table is measured against.
_WIDEST: Final = 100_000
#: Durations past this are surely typos (and would overflow a timedelta).
_LONGEST: Final = 100 * 365 * 86_400


class BadInput(Exception):
    """A command's input is wrong: exit 2 with this one line."""


def print_json(value: object) -> None:
    """Print one JSON object on stdout."""
    sys.stdout.write(json.dumps(value, default=str) + "\n")


def print_table(table: Table) -> None:
    """Print a table on stdout at its natural width, however narrow the terminal or pipe: rich
    would otherwise shorten its cells with an ellipsis, and an id cut short is no id."""
    unbounded = stdout.options.update_width(_WIDEST)
    needed = Measurement.get(stdout, unbounded, table).maximum
    if needed <= stdout.width:
        stdout.print(table)
        return
    # A console as wide as the table, on the same stream (`print(width=)` is capped at the
    # console's width): the terminal wraps the long lines, nothing is cut.
    wide = Console(
        file=stdout.file, width=needed, soft_wrap=True, force_terminal=stdout.is_terminal
    )
    wide.print(table)


def human_duration(seconds: float) -> str:
    """`850 ms`, `1.2 s`, `3 min 4 s`, `2 h 5 min`, `3 d 4 h`: for people, not for scripts."""
    if seconds < 0.9995:
        return f"{round(seconds * 1000)} ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86_400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86_400} d {whole % 86_400 // 3600} h"


def job_store(settings: Settings) -> JobStore:
    """The job store on the configured database."""
    return JobStore(engine=create_engine(settings.database_url))


def declared_pipeline(settings: Settings, name: str) -> Pipeline[object]:
    """The pipeline called `name`, after loading the shipped ones and `ONCELERY_PIPELINES`.

    Raises:
        BadInput: none has that name (the message lists those that exist).
    """
    load_pipelines(settings)
    try:
        return registry.get(name)
    except UnknownPipeline as exc:
        known = ", ".join(sorted(pipeline.name for pipeline in registry))
        raise BadInput(
            f"--pipeline: {exc} (declared: {known}; add yours with ONCELERY_PIPELINES)"
        ) from None


def parse_job_id(value: str, *, name: str = "JOB_ID") -> UUID:
    """A job id from the command line."""
    try:
        return UUID(value)
    except ValueError:
        raise BadInput(f"{name}: not a job id: {value!r}") from None


def parse_duration(value: str, *, name: str) -> float:
    """Seconds from `30d`, `12h`, `90m`, `45s` or `2w`."""
    match = _DURATION.fullmatch(value.strip().lower())
    if match is None:
        raise BadInput(f"{name}: expected a duration such as 30d, 12h, 90m or 45s, got {value!r}")
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds > _LONGEST:
        raise BadInput(f"{name}: {value!r} is longer than a hundred years")
    return seconds


def who(by: str | None) -> str:
    """The person acting: `--by`, else the login name."""
    if by is not None and by.strip():
        return by.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
