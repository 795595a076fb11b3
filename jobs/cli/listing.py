"""`oncelery jobs`: list and search jobs by state, pipeline, event id or order id; and
`oncelery --version`."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import metadata
from typing import Annotated

import typer
from rich.table import Table

from config import get_settings
from jobs.cli.support import (
    BadInput,
    JsonFlag,
    declared_pipeline,
    human_duration,
    print_json,
    print_table,
    stderr,
    stdout,
)
from ledger import JSON, Job, JobState, create_engine, find_jobs

#: The most rows one listing prints.
MAX_LIMIT = 1000


def register(cli: typer.Typer) -> None:
    """Add `jobs` and `--version` to the `oncelery` command line."""
    cli.command("jobs")(list_jobs)
    cli.callback()(_root)


def _show_version(wanted: bool) -> None:
    if wanted:
        stdout.print(f"oncelery {metadata.version('oncelery')}", highlight=False)
        raise typer.Exit


def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_show_version,
            help="Print oncelery's version and exit.",
        ),
    ] = False,
) -> None:
    # The version is handled by its callback: nothing to do for the subcommands.
    del version


def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state", help="Only jobs in this state (repeat for several): pending, running, …"
        ),
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only jobs of this pipeline.")
    ] = None,
    event_id: Annotated[
        str | None, typer.Option("--event-id", help="The job of this event (its business key).")
    ] = None,
    order_id: Annotated[
        str | None, typer.Option("--order-id", help="Jobs whose event names this order.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=MAX_LIMIT, help="At most this many jobs.")
    ] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Jobs, the most recently changed first: id, pipeline, event, state, the step it is at,
    when it was created and how long it took (or has run so far)."""
    states = _states(state or [])
    settings = get_settings()
    if pipeline is not None:
        declared_pipeline(settings, pipeline)
    found = find_jobs(
        create_engine(settings.database_url),
        states=states,
        pipeline=pipeline,
        event_id=_given("--event-id", event_id),
        order_id=_given("--order-id", order_id),
        limit=limit,
    )
    now = datetime.now(UTC)
    if as_json:
        print_json({"jobs": [job_view(job, now) for job in found]})
        return
    table = Table("job", "pipeline", "event", "state", "step", "created (UTC)", "took")
    for job in found:
        took = human_duration(job_seconds(job, now))
        table.add_row(
            str(job.id),
            job.pipeline,
            job.event_id,
            str(job.state),
            job.current_step or "",
            job.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            took if job.finished_at is not None else f"{took} so far",
        )
    print_table(table)
    stderr.print(f"{len(found)} job(s)", highlight=False)


def job_view(job: Job, now: datetime) -> dict[str, JSON]:
    """One job as `jobs --json` prints it."""
    return {
        "job_id": str(job.id),
        "pipeline": job.pipeline,
        "event_id": job.event_id,
        "order_id": job.context.get("order_id"),
        "state": str(job.state),
        "current_step": job.current_step,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "finished_at": None if job.finished_at is None else job.finished_at.isoformat(),
        "seconds": round(job_seconds(job, now), 3),
    }


def job_seconds(job: Job, now: datetime) -> float:
    """From the job's creation to its end, or to `now` while it has not ended."""
    end = job.finished_at or now
    return max(0.0, (end - job.created_at).total_seconds())


def _states(given: list[str]) -> list[JobState] | None:
    if not given:
        return None
    try:
        return list(dict.fromkeys(JobState(value) for value in given))
    except ValueError:
        wrong = next(value for value in given if value not in {str(s) for s in JobState})
        known = ", ".join(str(s) for s in JobState)
        raise BadInput(f"--state: there is no job state {wrong!r} (states: {known})") from None


def _given(option: str, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise BadInput(f"{option}: empty")
    return value
