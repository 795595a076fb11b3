"""The dead letters' statements, and those of what people do with them: replay, resolve,
purge."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.dml import ReturningDelete

from ledger import db
from ledger.queries.common import json_value
from ledger.schema import dead_letters, jobs, ledger_entries
from ledger.types import JSON, DeadLetterState, JobState, StepState

# --- dead letters -------------------------------------------------------------------------


def insert_dead_letter(values: dict[str, Any]) -> sa.Insert:
    """Write a dead letter; returns its id."""
    return sa.insert(dead_letters).values(values).returning(dead_letters.c.id)


def select_dead_letters(
    *,
    state: DeadLetterState | None,
    step: str | None = None,
    error_type: str | None = None,
    failed_before: datetime | None = None,
    failed_after: datetime | None = None,
    ids: Sequence[int] | None = None,
    job_id: UUID | None = None,
    limit: int | None = None,
) -> sa.Select[Any]:
    """Dead letters, oldest failure first, filtered by state, step, error type, age, id or job."""
    letter = dead_letters.c
    query = sa.select(dead_letters).order_by(letter.last_failed_at, letter.id)
    if state is not None:
        query = query.where(letter.state == str(state))
    if step is not None:
        query = query.where(letter.step == step)
    if error_type is not None:
        query = query.where(letter.error_type == error_type)
    if failed_before is not None:
        query = query.where(letter.last_failed_at < failed_before)
    if failed_after is not None:
        query = query.where(letter.last_failed_at >= failed_after)
    if ids is not None:
        query = query.where(letter.id.in_(list(ids)))
    if job_id is not None:
        query = query.where(letter.job_id == job_id)
    return query.limit(limit) if limit is not None else query


def close_dead_letter(letter_id: int, state: DeadLetterState, by: str) -> sa.Update:
    """Close an open dead letter (replayed or resolved); returns it, or nothing if it was not
    open — which is what makes a second replay of the same dead letter a no-op."""
    letter = dead_letters.c
    return (
        sa.update(dead_letters)
        .where(letter.id == letter_id, letter.state == str(DeadLetterState.OPEN))
        .values(state=str(state), closed_at=db.utcnow(), closed_by=by)
        .returning(letter.job_id, letter.step, letter.key, letter.pipeline)
    )


def delete_dead_letters(letter_ids: Sequence[int]) -> ReturningDelete[Any]:
    """Delete dead letters; returns their job ids."""
    return (
        sa.delete(dead_letters)
        .where(dead_letters.c.id.in_(list(letter_ids)))
        .returning(
            dead_letters.c.id, dead_letters.c.job_id, dead_letters.c.step, dead_letters.c.state
        )
    )


def count_open_dead_letters() -> sa.Select[Any]:
    """How many dead letters wait for a person."""
    return sa.select(sa.func.count()).where(dead_letters.c.state == str(DeadLetterState.OPEN))


# --- replay and resolve -------------------------------------------------------------------


def reset_entry(key: str, *, from_states: Sequence[StepState]) -> sa.Update:
    """Make a key claimable again, with a fresh attempt count (a replay starts a new run)."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(entry.key == key, entry.state.in_([str(s) for s in from_states]))
        .values(
            state=str(StepState.FAILED),
            attempts=0,
            owner=None,
            locked_until=None,
            first_failed_at=None,
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def settle_entry(key: str, result: JSON, job_id: UUID) -> sa.Update:
    """Record a person's word that an unknown or failed key of a job's did take effect (not
    a key another request holds: a fingerprint mismatch's letter names that key)."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(
            entry.key == key,
            entry.job_id == job_id,
            entry.state.in_([str(StepState.UNKNOWN), str(StepState.FAILED)]),
        )
        .values(
            state=str(StepState.SUCCEEDED),
            result=json_value(result),
            error=None,
            locked_until=None,
            first_failed_at=None,
            finished_at=db.utcnow(),
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def reopen_job(job_id: UUID, step: str) -> sa.Update:
    """Put a dead-lettered job back to running at `step` (the steps after it that succeeded
    are absorbed as duplicates when it gets there); returns it if it was dead-lettered."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == str(JobState.DEAD_LETTERED))
        .values(
            state=str(JobState.RUNNING),
            current_step=step,
            finished_at=None,
            updated_at=db.utcnow(),
        )
        .returning(jobs.c.id)
    )


def move_dead_job_on(job_id: UUID, step: str, result: JSON, next_step: str | None) -> sa.Update:
    """A job dead-lettered at `step`, which a person settled: give it the result and move it
    to `next_step` (or finish it); returns its new state (none: it is not dead at `step`)."""
    state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
    return (
        sa.update(jobs)
        .where(_dead_at(job_id, step))
        .values(
            results=db.json_set_key(jobs.c.results, sa.literal(step), json_value(result)),
            current_step=next_step,
            state=str(state),
            finished_at=db.utcnow() if next_step is None else None,
            updated_at=db.utcnow(),
        )
        .returning(jobs.c.state)
    )


def give_up_dead_job(job_id: UUID, step: str) -> sa.Update:
    """A job dead-lettered at `step` whose dead letter was purged becomes cancelled; returns
    it."""
    return (
        sa.update(jobs)
        .where(_dead_at(job_id, step))
        .values(state=str(JobState.CANCELLED), updated_at=db.utcnow())
        .returning(jobs.c.id)
    )


def _dead_at(job_id: UUID, step: str) -> sa.ColumnElement[bool]:
    """The job is dead-lettered at `step` (not one that moved on since, and died elsewhere:
    an old letter must not rewind it)."""
    return sa.and_(
        jobs.c.id == job_id,
        jobs.c.state == str(JobState.DEAD_LETTERED),
        jobs.c.current_step == step,
    )
