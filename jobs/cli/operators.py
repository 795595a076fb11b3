"""The operator's commands: `cancel`, `sweep`, `prune`, and the dead-letter desk's `dlq`
(`jobs.cli.dead_letters`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from config import get_settings
from jobs.cli import dead_letters
from jobs.cli.support import (
    ByOption,
    JsonFlag,
    job_store,
    parse_duration,
    parse_job_id,
    print_json,
    stdout,
    who,
)
from jobs.engine.runtime import load_pipelines
from jobs.engine.sweeper import sweep as run_sweep
from jobs.worker import CeleryDispatch, runtime
from jobs.worker.queues import broker_watch, queued_steps
from ledger import JSON, JobState, SignalLedger, StepState


def register(cli: typer.Typer) -> None:
    """Add the operator's commands to the `oncelery` command line."""
    dead_letters.register(cli)
    cli.command()(cancel)
    cli.command()(sweep)
    cli.command()(prune)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
    by: ByOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Stop a job before its next step. Effects already applied are reported, not undone."""
    settings = get_settings()
    store = job_store(settings)
    parsed = parse_job_id(job_id)
    before = store.get_job(parsed).state
    job = store.cancel(parsed, by=who(by), reason=reason)
    history = store.history(parsed)
    applied = {
        entry.step: entry.result
        for entry in history.entries
        if entry.state in (StepState.SUCCEEDED, StepState.STARTED, StepState.UNKNOWN)
    }
    cancelled = job.state is JobState.CANCELLED and before is not JobState.CANCELLED
    view: dict[str, JSON] = {
        "job_id": job_id,
        "state": str(job.state),
        "cancelled": cancelled,
        "steps_already_done": applied,
    }
    if as_json:
        print_json(view)
    else:
        stdout.print(
            f"job {job_id}: {job.state}" + ("" if cancelled else f" (was already {before})")
        )
        for step, result in applied.items():
            stdout.print(f"  already done, not undone: {step} -> {json.dumps(result)}")
    if not cancelled:
        raise typer.Exit(1)


def sweep(
    stalled_after: Annotated[
        float | None,
        typer.Option(min=0.0, help="Seconds without progress (default from settings)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Send again the step of every unfinished job that made no progress (what beat runs)."""
    load_pipelines(get_settings())
    dispatch = CeleryDispatch()
    report = run_sweep(
        runtime(),
        dispatch,
        stalled_after=stalled_after,
        queued=lambda: queued_steps(dispatch.sender),
        watch=broker_watch(dispatch.sender),
    )
    if as_json:
        print_json(
            {
                "redriven": report.redriven,
                "skipped": report.skipped,
                "job_ids": report.job_ids,
                "relayed": report.relayed,
                "backlog_wait": round(report.backlog_wait, 1),
                "deferred": report.deferred,
                "abandoned": report.abandoned,
                "lost": report.lost,
            }
        )
    else:
        backlog = (
            f" (waited {report.backlog_wait:.0f}s more for the queued messages)"
            if report.backlog_wait
            else ""
        )
        if report.deferred:
            backlog = " (the broker could not say how much is queued: only the oldest)"
        stdout.print(
            f"re-drove {report.redriven} stalled job(s){backlog}, relayed {report.relayed} "
            f"from the outbox; skipped {report.skipped}"
        )


def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished jobs to delete (30d).")
    ],
    batch: Annotated[int, typer.Option(min=1, max=100_000)] = 1000,
    as_json: JsonFlag = False,
) -> None:
    """Delete succeeded and cancelled jobs older than this, with their ledger entries and
    history, in batches; never a running job or a dead letter. Also signals: those kept past
    ONCELERY_SIGNAL_KEEP_FOR, and those a wait took before this."""
    seconds = parse_duration(older_than, name="--older-than")
    settings = get_settings()
    store = job_store(settings)
    deleted = store.prune(older_than=seconds, batch=batch)
    signals = SignalLedger(engine=store.engine, keep_for=settings.signal_keep_for)
    signals_deleted = signals.prune(older_than=seconds, batch=batch)
    if as_json:
        print_json(
            {"deleted": deleted, "signals_deleted": signals_deleted, "older_than_seconds": seconds}
        )
    else:
        stdout.print(f"deleted {deleted} finished job(s) and {signals_deleted} signal(s)")
