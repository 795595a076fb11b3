"""Statements behind `status`, the metrics and the home page: counts, ages, durations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.schema import jobs, step_events
from ledger.types import EventKind, JobState


def oldest_pending() -> sa.Select[Any]:
    """The database's clock, and when the oldest pending job was created (None if none)."""
    return sa.select(
        db.utcnow().label("now"),
        sa.select(sa.func.min(jobs.c.created_at))
        .where(jobs.c.state == str(JobState.PENDING))
        .scalar_subquery()
        .label("oldest"),
    )


def count_events_by_kind(kinds: Sequence[EventKind]) -> sa.Select[Any]:
    """How many history events there are of each kind."""
    return (
        sa.select(step_events.c.kind, sa.func.count().label("events"))
        .where(step_events.c.kind.in_([str(k) for k in kinds]))
        .group_by(step_events.c.kind)
    )


def recent_durations(window: float) -> sa.Select[Any]:
    """(step, minute, milliseconds) of every successful attempt in the last `window` seconds."""
    event = step_events.c
    return sa.select(event.step, db.minute_of(event.at).label("minute"), event.duration_ms).where(
        event.kind == str(EventKind.SUCCEEDED),
        event.duration_ms.is_not(None),
        event.at >= db.utcnow_plus(db.seconds(-window)),
    )


def step_percentiles(window: float, fractions: Sequence[float]) -> sa.Select[Any]:
    """Postgres: each step's duration percentiles (ms) over the last `window` seconds."""
    event = step_events.c
    columns = [
        sa.func.percentile_cont(fraction).within_group(event.duration_ms).label(f"p{n}")
        for n, fraction in enumerate(fractions)
    ]
    return (
        sa.select(event.step, sa.func.count().label("attempts"), *columns)
        .where(
            event.kind == str(EventKind.SUCCEEDED),
            event.duration_ms.is_not(None),
            event.at >= db.utcnow_plus(db.seconds(-window)),
        )
        .group_by(event.step)
    )


def minute_p99(window: float) -> sa.Select[Any]:
    """Postgres: the 99th percentile of step durations (ms) per minute of the window."""
    event = step_events.c
    minute = db.minute_of(event.at).label("minute")
    return (
        sa.select(
            minute, sa.func.percentile_cont(0.99).within_group(event.duration_ms).label("p99")
        )
        .where(
            event.kind == str(EventKind.SUCCEEDED),
            event.duration_ms.is_not(None),
            event.at >= db.utcnow_plus(db.seconds(-window)),
        )
        .group_by(minute)
    )


def completed_per_minute(window: float) -> sa.Select[Any]:
    """How many jobs succeeded in each minute of the last `window` seconds."""
    minute: ColumnElement[Any] = db.minute_of(jobs.c.finished_at).label("minute")
    return (
        sa.select(minute, sa.func.count().label("jobs"))
        .where(
            jobs.c.state == str(JobState.SUCCEEDED),
            jobs.c.finished_at >= db.utcnow_plus(db.seconds(-window)),
        )
        .group_by(minute)
    )


def duration_buckets(bounds: Sequence[float], window: float) -> sa.Select[Any]:
    """Per step: successful attempts of the last `window` seconds at or under each bound (ms),
    their count and sum — a histogram computed in the database."""
    event = step_events.c
    columns: list[ColumnElement[Any]] = [
        event.step,
        sa.func.count().label("attempts"),
        sa.func.coalesce(sa.func.sum(event.duration_ms), 0.0).label("total"),
    ]
    columns += [
        sa.func.sum(sa.case((event.duration_ms <= bound, 1), else_=0)).label(f"le{n}")
        for n, bound in enumerate(bounds)
    ]
    return (
        sa.select(*columns)
        .where(
            event.kind == str(EventKind.SUCCEEDED),
            event.duration_ms.is_not(None),
            event.at >= db.utcnow_plus(db.seconds(-window)),
        )
        .group_by(event.step)
    )


def schedule_to_start_buckets(bounds: Sequence[float], window: float) -> sa.Select[Any]:
    """Jobs started in the last `window` seconds at or under each bound of schedule-to-start
    latency (seconds from creation to the first claim), with their count and sum."""
    latency = db.seconds_between(jobs.c.started_at, jobs.c.created_at)
    columns: list[ColumnElement[Any]] = [
        sa.func.count().label("jobs"),
        sa.func.coalesce(sa.func.sum(latency), 0.0).label("total"),
    ]
    columns += [
        sa.func.sum(sa.case((latency <= bound, 1), else_=0)).label(f"le{n}")
        for n, bound in enumerate(bounds)
    ]
    return sa.select(*columns).where(
        jobs.c.started_at.is_not(None),
        jobs.c.started_at >= db.utcnow_plus(db.seconds(-window)),
    )


#: The states counted exactly in `status`; succeeded jobs, the bulk, are counted only when few.
UNFINISHED_OR_STOPPED = (
    JobState.PENDING,
    JobState.RUNNING,
    JobState.DEAD_LETTERED,
    JobState.CANCELLED,
)


def count_jobs_except_succeeded() -> sa.Select[Any]:
    """How many jobs are in each state but succeeded (a range scan of the state index)."""
    return (
        sa.select(jobs.c.state, sa.func.count().label("jobs"))
        .where(jobs.c.state.in_([str(s) for s in UNFINISHED_OR_STOPPED]))
        .group_by(jobs.c.state)
    )


def count_succeeded_jobs(limit: int) -> sa.Select[Any]:
    """Succeeded jobs, counted up to `limit` (past it, the caller estimates)."""
    capped = sa.select(sa.literal(1)).where(jobs.c.state == str(JobState.SUCCEEDED)).limit(limit)
    return sa.select(sa.func.count()).select_from(capped.subquery())


def estimated_job_rows() -> sa.TextClause:
    """Postgres: the planner's estimate of the jobs table's rows (kept by autovacuum)."""
    return sa.text("SELECT reltuples::bigint FROM pg_class WHERE oid = 'jobs'::regclass")
