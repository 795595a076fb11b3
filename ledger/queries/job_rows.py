"""The jobs table's statements: creating, reading, starting, advancing and finishing jobs."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import FromClause

from ledger import db
from ledger.queries.common import ACTIVE, ANY_ID, json_value, param
from ledger.schema import JSONDocument, jobs
from ledger.types import JSON, JobState

#: What each new job's row is given; the rest is the same for every job (`insert_jobs`).
NEW_JOB_COLUMNS = (
    "id",
    "pipeline",
    "event_id",
    "context",
    "fingerprint",
    "step_keys",
    "current_step",
)


@functools.cache
def insert_jobs(dialect_name: str, dispatched: bool) -> Any:
    """Insert jobs, skipping events already seen; returns the ids of the rows inserted.

    Built once per dialect and outbox choice (`dispatched`: the caller sends the first steps
    itself, so the jobs skip the outbox); run it with one parameter set per job, keyed by
    `NEW_JOB_COLUMNS` (SQLAlchemy then sends them as multi-row INSERTs, compiled once).
    """
    insert = db.insert_for(dialect_name)
    given = {name: sa.bindparam(name, type_=jobs.c[name].type) for name in NEW_JOB_COLUMNS}
    return (
        insert(jobs)
        .values(
            **given,
            state=str(JobState.PENDING),
            results=sa.literal({}, JSONDocument),
            created_at=db.utcnow(),
            updated_at=db.utcnow(),
            dispatched_at=db.utcnow() if dispatched else None,
        )
        .on_conflict_do_nothing(index_elements=[jobs.c.pipeline, jobs.c.event_id])
        .returning(jobs.c.id, jobs.c.pipeline, jobs.c.event_id)
    )


def mark_awaited(job_id: UUID) -> sa.Update:
    """Note that someone waits for a job's end (its end is then announced); returns its
    state. `updated_at` is left alone: waiting is no progress."""
    return sa.update(jobs).where(jobs.c.id == job_id).values(awaited=True).returning(jobs.c.state)


def announce(channel: str, payload: str) -> sa.Select[Any]:
    """Postgres only: NOTIFY a channel, heard when (and if) the transaction commits."""
    return sa.select(sa.func.pg_notify(channel, payload))


def select_job_ids(pipeline: str, event_ids: Sequence[str]) -> sa.Select[Any]:
    """The job ids of the given events of one pipeline, with their content's fingerprint."""
    return sa.select(jobs.c.id, jobs.c.event_id, jobs.c.fingerprint).where(
        jobs.c.pipeline == pipeline, jobs.c.event_id.in_(event_ids)
    )


def select_contexts(job_ids: Sequence[UUID]) -> sa.Select[Any]:
    """Some jobs' ids and contexts."""
    return sa.select(jobs.c.id, jobs.c.context).where(jobs.c.id.in_(list(job_ids)))


def ping() -> sa.Select[Any]:
    """The cheapest statement there is: is the database there?"""
    return sa.select(sa.literal(1))


def select_job(job_id: UUID) -> sa.Select[Any]:
    """One job's row."""
    return sa.select(jobs).where(jobs.c.id == job_id)


def select_jobs(
    state: JobState | None,
    limit: int,
    *,
    pipeline: str | None = None,
    order_id: str | None = None,
) -> sa.Select[Any]:
    """The most recently created jobs, optionally of one state, pipeline or order id."""
    query = sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(jobs.c.state == str(state))
    if pipeline is not None:
        query = query.where(jobs.c.pipeline == pipeline)
    if order_id is not None:
        query = query.where(jobs.c.context["order_id"].as_string() == order_id)
    return query


def count_jobs_by_state(event_prefix: str | None = None) -> sa.Select[Any]:
    """How many jobs are in each state, optionally only those whose event id has a prefix."""
    query = sa.select(jobs.c.state, sa.func.count().label("jobs")).group_by(jobs.c.state)
    if event_prefix is not None:
        query = query.where(jobs.c.event_id.startswith(event_prefix, autoescape=True))
    return query


def select_jobs_by_event_prefix(prefix: str) -> sa.Select[Any]:
    """Jobs whose event id starts with a prefix (a demo or test run tags its events so)."""
    return sa.select(jobs).where(jobs.c.event_id.startswith(prefix, autoescape=True))


def start_job() -> sa.Update:
    """Mark a job (`p_job_id`) that may still run as running; returns what its step
    (`p_step_key`) needs. A part of the claim (see `queries.claims`)."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == param("job_id", ANY_ID, sa.Uuid()), jobs.c.state.in_(ACTIVE))
        .values(
            state=str(JobState.RUNNING),
            updated_at=db.utcnow(),
            started_at=sa.func.coalesce(jobs.c.started_at, db.utcnow()),
        )
        .returning(
            jobs.c.id,
            jobs.c.context,
            jobs.c.results,
            jobs.c.fingerprint,
            jobs.c.current_step,
            jobs.c.step_keys[param("step_key", "", sa.JSON.JSONStrIndexType())]
            .as_string()
            .label("key"),
        )
    )


def advance_job(after: FromClause, *, finishes: bool, with_result: bool) -> sa.Update:
    """Move an active job (`p_job_id`) to `p_job_state` at `p_current_step`, if `after` (the
    fenced ledger update) has a row; returns its state. A part of the record.

    A job cancelled or dead-lettered meanwhile keeps its state, step and finish time: the step's
    result (`p_result_step`, `p_result`) is still recorded (in its entry and the job's results,
    so it is reported), but the job does not move.
    """
    active = jobs.c.state.in_(ACTIVE)
    values: dict[str, Any] = {
        "state": sa.case((active, param("job_state", "", sa.String())), else_=jobs.c.state),
        "current_step": sa.case(
            (active, param("current_step", "", sa.String())), else_=jobs.c.current_step
        ),
        "updated_at": db.utcnow(),
    }
    if finishes:
        values["finished_at"] = sa.case((active, db.utcnow()), else_=jobs.c.finished_at)
    if with_result:
        values["results"] = db.json_set_key(
            jobs.c.results,
            param("result_step", "", sa.String()),
            param("result", {}, JSONDocument),
        )
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", ANY_ID, sa.Uuid()),
            sa.exists(sa.select(sa.literal(1)).select_from(after)),
        )
        .values(values)
        .returning(jobs.c.state)
    )


def move_on_with_result(job_id: UUID, step: str, value: JSON, next_step: str | None) -> sa.Update:
    """Give an active job still at `step` that step's result — one another job recorded under
    the same key, or a map's summary once its items are settled — and move it on to
    `next_step` (or finish it); returns its state."""
    state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
    values: dict[str, Any] = {
        "results": db.json_set_key(jobs.c.results, sa.literal(step), json_value(value)),
        "current_step": next_step,
        "state": str(state),
        "updated_at": db.utcnow(),
    }
    if next_step is None:
        values["finished_at"] = db.utcnow()
    return (
        sa.update(jobs)
        # At that step still: a job another delivery moved on meanwhile keeps its place.
        .where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE), jobs.c.current_step == step)
        .values(values)
        .returning(jobs.c.state)
    )


def finish_job(job_id: UUID, state: JobState) -> sa.Update:
    """End an active job in a final state (dead-lettered, cancelled); returns its state, and
    what a dead letter copies (pipeline, context, results)."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE))
        .values(state=str(state), updated_at=db.utcnow(), finished_at=db.utcnow())
        .returning(jobs.c.state, jobs.c.pipeline, jobs.c.context, jobs.c.results)
    )
