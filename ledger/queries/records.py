"""The record's statements, each built once per shape and run with `record_params`: an owner's
outcome on its key (fenced by its owner token), its history event and its job's next state."""

from __future__ import annotations

import functools
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement, FromClause

from ledger import db
from ledger.queries.claims import claim_from
from ledger.queries.common import ACTIVE, ANY_ID, param
from ledger.queries.history import append_event_after
from ledger.queries.job_rows import advance_job
from ledger.schema import JSONDocument, jobs, ledger_entries
from ledger.types import JSON, EventKind, JobState, StepState


def record_params(
    *,
    key: str,
    owner: UUID,
    job_id: UUID,
    event: tuple[float | None, JSON],
    job: tuple[JobState, str | None],
    result: tuple[str, JSON] | None = None,
    error: JSON = None,
) -> dict[str, Any]:
    """The parameters of a record: the key and its owner, the event's duration and detail,
    the job's new state and step, the step's result or error."""
    duration_ms, detail = event
    state, current_step = job
    values: dict[str, Any] = {
        "p_record_key": key,
        "p_record_owner": owner,
        "p_job_id": job_id,
        "p_duration_ms": duration_ms,
        "p_detail": detail,
        "p_job_state": str(state),
        "p_current_step": current_step,
    }
    if result is not None:
        values["p_result_step"], values["p_result"] = result
    if error is not None:
        values["p_error"] = error
    return values


def finish_params(
    key: str, owner: UUID, *, result: JSON = None, error: JSON = None
) -> dict[str, Any]:
    """The parameters of `finish_entry` run alone: a missing result or error is SQL NULL."""
    return {
        "p_record_key": key,
        "p_record_owner": owner,
        "p_result": sa.null() if result is None else result,
        "p_error": sa.null() if error is None else error,
    }


def _held_by() -> tuple[ColumnElement[bool], ...]:
    """The fence: the key (`p_record_key`) is still started, under this owner's token."""
    entry = ledger_entries.c
    return (
        entry.key == param("record_key", "", sa.String()),
        entry.owner == param("record_owner", ANY_ID, sa.Uuid()),
        entry.state == str(StepState.STARTED),
    )


@functools.cache
def finish_entry(state: StepState) -> sa.Update:
    """Record an owner's outcome on its key, fenced by the owner token: a success's
    `p_result`, any other outcome's `p_error`; returns the entry."""
    entry = ledger_entries.c
    succeeded = state is StepState.SUCCEEDED
    return (
        sa.update(ledger_entries)
        .where(*_held_by())
        .values(
            state=str(state),
            result=param("result", {}, JSONDocument) if succeeded else sa.null(),
            error=sa.null() if succeeded else param("error", {}, JSONDocument),
            locked_until=None,
            finished_at=db.utcnow(),
            updated_at=db.utcnow(),
            # The first failure of a run of failures; a success ends the run.
            first_failed_at=None
            if succeeded
            else sa.func.coalesce(entry.first_failed_at, db.utcnow()),
        )
        .returning(entry.key, entry.step, entry.attempts, entry.first_failed_at)
    )


def set_entry_result(key: str, result: JSON) -> sa.Update:
    """Give a recorded key its result (known only once its record wrote everything else)."""
    return (
        sa.update(ledger_entries)
        .where(ledger_entries.c.key == key)
        .values(result=sa.literal(result, JSONDocument))
    )


def _entry_after_record() -> FromClause:
    """The recorded entry's (key, step, attempts), for the statements that follow a record."""
    entry = ledger_entries.c
    return (
        sa.select(entry.key, entry.step, entry.attempts)
        .where(entry.key == param("record_key", "", sa.String()))
        .subquery()
    )


def _outcome(kind: EventKind) -> StepState:
    return StepState.SUCCEEDED if kind is EventKind.SUCCEEDED else StepState.FAILED


@functools.cache
def record_statements(kind: EventKind, finishes: bool) -> tuple[sa.Update, sa.Insert, sa.Update]:
    """SQLite: a record (a success, or a failed attempt to retry) as three statements, run in
    one transaction: finish the entry, append its event, move the job on (or finish it)."""
    after = _entry_after_record()
    succeeded = kind is EventKind.SUCCEEDED
    return (
        finish_entry(_outcome(kind)),
        append_event_after(after, kind),
        advance_job(after, finishes=finishes, with_result=succeeded),
    )


@functools.cache
def record_template(kind: EventKind, finishes: bool) -> sa.Select[Any]:
    """Postgres: a record (a success, or a failed attempt to retry) in one statement: finish
    the entry, append its event, move the job on (or finish it).

    Returns (key, job state); no row when the fence rejected the owner.
    """
    finished = finish_entry(_outcome(kind)).cte("finished")
    event = append_event_after(finished, kind).cte("event")
    succeeded = kind is EventKind.SUCCEEDED
    job = advance_job(finished, finishes=finishes, with_result=succeeded).cte("job")
    return (
        sa.select(finished.c.key, job.c.state)
        .select_from(finished.outerjoin(job, sa.true()))
        .add_cte(event)
    )


@functools.cache
def record_and_claim_template(takeover_expired: bool) -> sa.Select[Any]:
    """Postgres, the fast path: record a success, append its event, move the job to the next
    step (`p_step`) and claim that step's key for `p_owner`, in one statement; run it with
    `record_params` and `claim_params` merged.

    Returns no row when the fence rejected the record; a `job_state` other than running
    when the job was no longer active (the result is recorded on it, as in the chained mode,
    but it does not move and nothing is claimed); otherwise the same columns as
    `claim_template`, for the next step.
    """
    finished = finish_entry(StepState.SUCCEEDED).cte("finished")
    event = append_event_after(finished, EventKind.SUCCEEDED).cte("event")
    job = _move_on_to_claim(finished).cte("job")
    claimed, existing, columns = claim_from(job, takeover_expired)
    return (
        sa.select(finished.c.key.label("recorded_key"), job.c.state.label("job_state"), *columns)
        .select_from(
            finished.outerjoin(job, sa.true())
            .outerjoin(claimed, sa.true())
            .outerjoin(existing, existing.c.key == job.c.key)
        )
        .add_cte(event)
    )


def _move_on_to_claim(finished: FromClause) -> sa.Update:
    """Give an active job its step's result and move it to the next step, if `finished` has
    a row; returns what the next step's claim needs."""
    active = jobs.c.state.in_(ACTIVE)
    next_key = jobs.c.step_keys[param("step_key", "", sa.JSON.JSONStrIndexType())]
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", ANY_ID, sa.Uuid()),
            sa.exists(sa.select(sa.literal(1)).select_from(finished)),
        )
        .values(
            results=db.json_set_key(
                jobs.c.results,
                param("result_step", "", sa.String()),
                param("result", {}, JSONDocument),
            ),
            current_step=sa.case(
                (active, param("step", "", sa.String())), else_=jobs.c.current_step
            ),
            state=sa.case((active, str(JobState.RUNNING)), else_=jobs.c.state),
            updated_at=db.utcnow(),
        )
        .returning(
            jobs.c.id,
            jobs.c.state,
            jobs.c.context,
            jobs.c.results,
            jobs.c.fingerprint,
            jobs.c.current_step,
            # RETURNING sees the row as updated: a job that did not move on claims nothing.
            sa.case(
                (jobs.c.state == str(JobState.RUNNING), next_key.as_string()), else_=sa.null()
            ).label("key"),
        )
    )


def renew_params(key: str, owner: UUID, lease_seconds: float) -> dict[str, Any]:
    """The parameters of `renew_lease`."""
    return {"p_record_key": key, "p_record_owner": owner, "p_lease": lease_seconds}


@functools.cache
def renew_lease() -> sa.Update:
    """Extend a key's lease by `p_lease` seconds from now, if its owner still holds it;
    returns it then."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(*_held_by())
        .values(
            locked_until=db.utcnow_plus(param("lease", 0.0, sa.Float())),
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def mark_unknown(key: str, owner: UUID) -> sa.Update:
    """Declare an at-most-once key `unknown`, if `owner` still holds it with an expired lease;
    returns it then (a late record by that owner, or a takeover, leaves it alone)."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(
            entry.key == key,
            entry.state == str(StepState.STARTED),
            entry.owner == owner,
            entry.locked_until < db.utcnow(),
        )
        .values(state=str(StepState.UNKNOWN), locked_until=None, updated_at=db.utcnow())
        .returning(entry.key)
    )


def end_started(key: str, state: StepState) -> sa.Update:
    """End a `started` key as `state`, whoever holds it: its owner's process was killed from
    outside (a hard time limit), so no record will come; returns it if it was `started`."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(entry.key == key, entry.state == str(StepState.STARTED))
        .values(state=str(state), locked_until=None, updated_at=db.utcnow())
        .returning(entry.key)
    )
