"""A read-only step's statements (Postgres), run with `read_only_params`: a delivery reads its
job instead of claiming a key, and records the result fenced by the job's current step (on the
fast path claiming the next step in the same statement, with `claim_params`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.expression import CTE, ColumnElement

from ledger import db
from ledger.queries.claims import claim_from
from ledger.queries.common import ACTIVE, param
from ledger.queries.limits import LimitsShape
from ledger.schema import JSONDocument, jobs, ledger_entries, step_events
from ledger.types import JSON, EventKind, JobState, StepState

_KEY_TYPE = sa.JSON.JSONStrIndexType()


@functools.cache
def read_jobs_template() -> sa.Select[Any]:
    """Jobs by id (`p_job_ids`), with what a read-only step (`p_step_key`) needs: state,
    context, results, current step, fingerprint, the step's key, and its entry's state,
    attempts, step and fingerprint (a key first used for another request must be claimed,
    to fail loudly)."""
    key = jobs.c.step_keys[param("step_key", "", _KEY_TYPE)].as_string()
    entry = ledger_entries.alias("entry")
    return (
        sa.select(
            jobs.c.id,
            jobs.c.state,
            jobs.c.context,
            jobs.c.results,
            jobs.c.current_step,
            jobs.c.fingerprint,
            key.label("key"),
            entry.c.state.label("entry_state"),
            entry.c.attempts.label("entry_attempts"),
            entry.c.step.label("entry_step"),
            entry.c.fingerprint.label("entry_fingerprint"),
        )
        .select_from(jobs.outerjoin(entry, entry.c.key == key))
        .where(jobs.c.id == sa.any_(param("job_ids", [], postgresql.ARRAY(sa.Uuid()))))
    )


@functools.cache
def record_read_template(
    next_step: bool, claim_next: bool, takeover_expired: bool, limits: LimitsShape | None = None
) -> Any:
    """Record a read-only step's result, if its job is still at that step: upsert its key as
    `succeeded` (fencing out a claim another delivery may hold), append its event, move an
    active job on (`next_step`, else finish it) and, with `claim_next`, claim the next step.

    Answers no row when the job was not at that step (another delivery recorded it);
    otherwise `recorded_key`, `job_state` and, with `claim_next`, the columns of
    `claim_template` for the next step (nothing claimed if the job had stopped).
    """
    job = _advance_from_read(next_step, claim_next)
    entry = _upsert_read_entry(job)
    event = _append_read_event(job, entry)
    if not claim_next:
        return sa.select(
            job.c.read_key.label("recorded_key"), job.c.state.label("job_state")
        ).add_cte(entry, event)
    claimed, existing, columns = claim_from(job, takeover_expired, limits)
    return (
        sa.select(job.c.read_key.label("recorded_key"), job.c.state.label("job_state"), *columns)
        .select_from(
            job.outerjoin(claimed, sa.true()).outerjoin(existing, existing.c.key == job.c.key)
        )
        .add_cte(entry, event)
    )


def read_only_params(
    *,
    job_id: UUID,
    step: str,
    owner: UUID,
    result: JSON,
    duration_ms: float | None,
    next_step: str | None,
    ran_on: tuple[str, Mapping[str, JSON]],
    assumed: bool = False,
) -> dict[str, Any]:
    """The parameters of `record_read_template` (merge `claim_params` with the same `owner`
    to claim the next step; `ran_on`: the key and context the step ran on; `assumed`: the
    reading was not read, see `Reading.assumed`)."""
    key, context = ran_on
    return {
        "p_ran_key": key,
        "p_ran_context": dict(context),
        "p_assumed": assumed,
        "p_job_id": job_id,
        "p_owner": owner,
        "p_result_step": step,
        "p_read_key_step": step,
        "p_result": result,
        "p_detail": result,
        "p_duration_ms": duration_ms,
        "p_took": -(duration_ms or 0.0) / 1000,
        "p_current_step": next_step,
    }


def _advance_from_read(next_step: bool, claim_next: bool) -> CTE:
    """Record the read-only step's (`p_result_step`) result on its job, if the job is still
    at that step; move it on only if it is active (a job cancelled since it was read keeps the
    result, as after any step, and goes no further). A reading that was not read
    (`p_assumed`) records only while the step's key has no entry."""
    read_step = param("result_step", "", sa.String())
    read_key = jobs.c.step_keys[param("read_key_step", "", _KEY_TYPE)].as_string()
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", UUID(int=0), sa.Uuid()),
            # The fence: whoever moved the job on first recorded the step.
            jobs.c.current_step == read_step,
            # The step ran on what the job holds: a reading its message brought is the
            # message's word only (stale, or forged by whoever can publish), and Postgres has
            # the last one. A reading that differs records nothing; the claim it falls back on
            # runs the step on the row.
            read_key == param("ran_key", "", sa.String()),
            jobs.c.context == param("ran_context", {}, JSONDocument),
            # A key first used for another request (or, for a reading not read, used at all):
            # nothing is recorded, and the claim the job falls back on tells why
            # (`FingerprintMismatch`, say).
            ~_key_reused(read_key, read_step),
        )
        .values(_moved_on_from_read(read_step, next_step, claim_next))
        .returning(*_returned_from_read(claim_next))
        .cte("job")
    )


def _moved_on_from_read(
    read_step: ColumnElement[Any], next_step: bool, claim_next: bool
) -> dict[str, Any]:
    """The job's row after its read-only step: its result, and the next step (or the end)
    if it is active."""
    active = jobs.c.state.in_(ACTIVE)
    values: dict[str, Any] = {
        "results": db.json_set_key(jobs.c.results, read_step, param("result", {}, JSONDocument)),
        "started_at": sa.func.coalesce(jobs.c.started_at, db.utcnow()),
        "updated_at": db.utcnow(),
    }
    if next_step:
        # On the fast path the next step's name is the claim's own `p_step`.
        following: Any = param("step", "", sa.String()) if claim_next else param("current_step", "")
        state: Any = sa.literal(str(JobState.RUNNING))
    else:
        following, state = sa.null(), sa.literal(str(JobState.SUCCEEDED))
        values["finished_at"] = sa.case((active, db.utcnow()), else_=jobs.c.finished_at)
    values["current_step"] = sa.case((active, following), else_=jobs.c.current_step)
    values["state"] = sa.case((active, state), else_=jobs.c.state)
    return values


def _returned_from_read(claim_next: bool) -> list[ColumnElement[Any]]:
    """What the job's update answers: its row, the read step's key and, with `claim_next`,
    the next step's key to claim."""
    returned = [
        jobs.c.id,
        jobs.c.state,
        jobs.c.context,
        jobs.c.results,
        jobs.c.fingerprint,
        jobs.c.current_step,
        jobs.c.step_keys[param("read_key_step", "", _KEY_TYPE)].as_string().label("read_key"),
    ]
    if claim_next:
        # RETURNING sees the row as updated: a job that did not move on claims nothing.
        next_key = jobs.c.step_keys[param("step_key", "", _KEY_TYPE)].as_string()
        moved_on = jobs.c.state == str(JobState.RUNNING)
        returned.append(sa.case((moved_on, next_key), else_=sa.null()).label("key"))
    return returned


def _key_reused(read_key: ColumnElement[Any], read_step: ColumnElement[Any]) -> sa.Exists:
    """The read step's key has an entry for another request (or any entry, for a reading
    that was not read)."""
    entry = ledger_entries.alias("same_key")
    return sa.exists().where(
        entry.c.key == read_key,
        sa.or_(
            entry.c.fingerprint != jobs.c.fingerprint,
            entry.c.step != read_step,
            # A reading that was not read stands for one taken as the job was created, when
            # its key had no entry: it counts only while that holds (no other delivery tried,
            # holds or did the step; no other job did it). Else the delivery claims.
            param("assumed", False, sa.Boolean()),
        ),
    )


_READ_ENTRY_COLUMNS = [
    "key",
    "job_id",
    "fingerprint",
    "step",
    "state",
    "owner",
    "attempts",
    "result",
    "started_at",
    "finished_at",
    "created_at",
    "updated_at",
]


def _upsert_read_entry(job: CTE) -> CTE:
    """The read-only step's key as `succeeded`, stamped with this record's owner token (so a
    retry after an ambiguous commit knows its own): new, after a failed attempt, or taken
    from a claim another delivery of the same job holds (whose record is then refused by its
    fence). Another job's claim on the same key is left alone."""
    now, began = db.utcnow(), db.utcnow_plus(param("took", 0.0, sa.Float()))
    source = sa.select(
        job.c.read_key,
        job.c.id,
        job.c.fingerprint,
        param("result_step", "", sa.String()),
        sa.literal(str(StepState.SUCCEEDED)),
        param("owner", UUID(int=0), sa.Uuid()),
        sa.literal(1),
        param("result", {}, JSONDocument),
        began,
        now,
        # Created as the step began: before the next step's key, claimed in this statement.
        began,
        now,
    ).where(job.c.read_key.is_not(None))
    insert = postgresql.insert(ledger_entries).from_select(_READ_ENTRY_COLUMNS, source)
    entry, excluded = ledger_entries.c, insert.excluded
    return (
        insert.on_conflict_do_update(
            index_elements=[entry.key],
            set_=_read_entry_over(excluded),
            where=sa.and_(
                sa.or_(
                    entry.state == str(StepState.FAILED),
                    sa.and_(entry.state == str(StepState.STARTED), entry.job_id == excluded.job_id),
                ),
                entry.fingerprint == excluded.fingerprint,
                entry.step == excluded.step,
            ),
        )
        .returning(entry.key, entry.attempts)
        .cte("entry")
    )


def _read_entry_over(excluded: Any) -> dict[str, Any]:
    """What the read step's record writes over a failed entry, or a claim of the same job."""
    entry = ledger_entries.c
    return {
        "job_id": excluded.job_id,
        "state": excluded.state,
        "result": excluded.result,
        "owner": excluded.owner,
        "locked_until": None,
        "error": None,
        # A failed attempt's key counts this one; a claim counted it already.
        "attempts": sa.case(
            (entry.state == str(StepState.FAILED), entry.attempts + 1),
            else_=entry.attempts,
        ),
        "started_at": excluded.started_at,
        "finished_at": excluded.finished_at,
        "updated_at": excluded.updated_at,
        "first_failed_at": None,
    }


def _append_read_event(job: CTE, entry: CTE) -> CTE:
    """The step's `succeeded` event (even when the key was another job's already)."""
    source = sa.select(
        job.c.id,
        param("result_step", "", sa.String()),
        job.c.read_key,
        sa.func.coalesce(entry.c.attempts, 1),
        sa.literal(str(EventKind.SUCCEEDED)),
        db.utcnow(),
        param("duration_ms", 0.0, sa.Float()),
        param("detail", {}, JSONDocument),
    ).select_from(job.outerjoin(entry, sa.true()))
    columns = ["job_id", "step", "key", "attempt", "kind", "at", "duration_ms", "detail"]
    return (
        sa.insert(step_events).from_select(columns, source).returning(step_events.c.id).cte("event")
    )
