"""The step protocol's statements on ledger entries: claiming and recording keys, and the
statements that claim or record a key, advance its job and add to its history in one round
trip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import CTE, ColumnElement, FromClause

from ledger import db
from ledger.queries.common import ACTIVE, param
from ledger.queries.history import append_event_after
from ledger.queries.job_rows import advance_job, start_job
from ledger.schema import JSONDocument, jobs, ledger_entries, step_events
from ledger.types import JSON, EventKind, JobState, StepState


def claim_step(
    dialect_name: str,
    source: sa.Select[Any],
    *,
    step: str,
    owner: UUID,
    lease_seconds: float,
    takeover_expired: bool,
) -> Any:
    """Insert a key as started, or take over a failed key (or an expired one if allowed).

    `source` yields one row of (key, job_id, fingerprint). The conflict branch only fires for
    the same fingerprint and step, so a key reused for different input is never taken over.
    Re-claiming with the same owner (a retry after an ambiguous commit) keeps the attempt count.
    Returns `attempts` when the key is now ours, nothing otherwise.
    """
    columns = [
        "key",
        "job_id",
        "fingerprint",
        "step",
        "state",
        "owner",
        "locked_until",
        "attempts",
        "started_at",
        "created_at",
        "updated_at",
    ]
    source = source.add_columns(
        param("step", step, sa.String()),
        sa.literal(str(StepState.STARTED)),
        param("owner", owner, sa.Uuid()),
        db.utcnow_plus(param("lease", lease_seconds, sa.Float())),
        sa.literal(1),
        db.utcnow(),
        db.utcnow(),
        db.utcnow(),
    )
    insert = db.insert_for(dialect_name)(ledger_entries).from_select(columns, source)
    entry, excluded = ledger_entries.c, insert.excluded
    started = entry.state == str(StepState.STARTED)
    takeable = [
        entry.state == str(StepState.FAILED),
        sa.and_(started, entry.owner == excluded.owner),
    ]
    if takeover_expired:
        takeable.append(sa.and_(started, entry.locked_until < db.utcnow()))
    return insert.on_conflict_do_update(
        index_elements=[entry.key],
        set_={
            "job_id": excluded.job_id,
            "state": excluded.state,
            "owner": excluded.owner,
            "locked_until": excluded.locked_until,
            "attempts": sa.case(
                (entry.owner == excluded.owner, entry.attempts), else_=entry.attempts + 1
            ),
            "error": None,
            "started_at": excluded.started_at,
            "finished_at": None,
            "updated_at": excluded.updated_at,
        },
        where=sa.and_(
            entry.fingerprint == excluded.fingerprint,
            entry.step == excluded.step,
            sa.or_(*takeable),
        ),
    ).returning(entry.attempts)


def claim_step_in_one(
    job_id: UUID, *, step: str, owner: UUID, lease_seconds: float, takeover_expired: bool
) -> sa.Select[Any]:
    """Postgres: start the job, claim its step and read the existing entry in one statement."""
    job = start_job(job_id, step).cte("job")
    claimed, existing, columns = claim_from(
        job, step=step, owner=owner, lease_seconds=lease_seconds, takeover_expired=takeover_expired
    )
    return sa.select(*columns).select_from(
        job.outerjoin(claimed, sa.true()).outerjoin(existing, existing.c.key == job.c.key)
    )


def claim_from(
    job: CTE, *, step: str, owner: UUID, lease_seconds: float, takeover_expired: bool
) -> tuple[CTE, FromClause, list[ColumnElement[Any]]]:
    """Claim the key of `job` (a CTE returning the started job's row) for `owner`: the claim,
    the entry as it stood when the statement began (what the claim found if it lost), and the
    columns `claim_step_in_one` answers with."""
    claimed = claim_step(
        "postgresql",
        # A job whose plan lacks the step claims nothing (the caller raises StepNotInJob).
        sa.select(job.c.key, job.c.id, job.c.fingerprint).where(job.c.key.is_not(None)),
        step=step,
        owner=owner,
        lease_seconds=lease_seconds,
        takeover_expired=takeover_expired,
    ).cte("claimed")
    existing = ledger_entries.alias("existing")
    columns = [
        job.c.context,
        job.c.results,
        job.c.key,
        job.c.fingerprint,
        job.c.current_step,
        claimed.c.attempts.label("claimed_attempts"),
        *_entry_columns(existing),
    ]
    return claimed, existing, columns


def select_entry_for_claim(key: str) -> sa.Select[Any]:
    """The entry a claim lost to, with whether its lease has run out."""
    return sa.select(*_entry_columns(ledger_entries)).where(ledger_entries.c.key == key)


def _entry_columns(entry: FromClause) -> list[ColumnElement[Any]]:
    return [
        entry.c.job_id.label("entry_job_id"),
        entry.c.step.label("entry_step"),
        entry.c.state.label("entry_state"),
        entry.c.fingerprint.label("entry_fingerprint"),
        entry.c.result.label("entry_result"),
        entry.c.attempts.label("entry_attempts"),
        entry.c.owner.label("entry_owner"),
        entry.c.locked_until.label("entry_locked_until"),
        (entry.c.locked_until < db.utcnow()).label("entry_lease_expired"),
    ]


def _held_by(key: str, owner: UUID) -> tuple[ColumnElement[bool], ...]:
    """The fence: the key is still started, under this owner's token."""
    entry = ledger_entries.c
    return (
        entry.key == param("record_key", key, sa.String()),
        entry.owner == param("record_owner", owner, sa.Uuid()),
        entry.state == str(StepState.STARTED),
    )


def finish_entry(
    key: str, owner: UUID, *, state: StepState, result: JSON, error: JSON
) -> sa.Update:
    """Record an owner's outcome on its key, fenced by the owner token; returns the entry."""
    entry = ledger_entries.c
    failed = state is not StepState.SUCCEEDED
    return (
        sa.update(ledger_entries)
        .where(*_held_by(key, owner))
        .values(
            state=str(state),
            result=param("result", result, JSONDocument) if result is not None else sa.null(),
            error=param("error", error, JSONDocument) if error is not None else sa.null(),
            locked_until=None,
            finished_at=db.utcnow(),
            updated_at=db.utcnow(),
            # The first failure of a run of failures; a success ends the run.
            first_failed_at=sa.func.coalesce(entry.first_failed_at, db.utcnow())
            if failed
            else None,
        )
        .returning(entry.key, entry.step, entry.attempts, entry.first_failed_at)
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


def renew_lease(key: str, owner: UUID, lease_seconds: float) -> sa.Update:
    """Extend a key's lease from now, if `owner` still holds it; returns it then."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(*_held_by(key, owner))
        .values(
            locked_until=db.utcnow_plus(param("lease", lease_seconds, sa.Float())),
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def select_entry(key: str) -> sa.Select[Any]:
    """One ledger entry."""
    return sa.select(ledger_entries).where(ledger_entries.c.key == key)


def select_entries_for_job(job_id: UUID) -> sa.Select[Any]:
    """The entries a job claimed, or adopted from another job, oldest first."""
    adopted = sa.select(step_events.c.key).where(
        step_events.c.job_id == job_id, step_events.c.key.is_not(None)
    )
    return (
        sa.select(ledger_entries)
        .where(sa.or_(ledger_entries.c.job_id == job_id, ledger_entries.c.key.in_(adopted)))
        .order_by(ledger_entries.c.created_at)
    )


def select_entries_of_steps(
    steps: Sequence[tuple[str, str]], keys: Sequence[str] | None
) -> sa.Select[Any]:
    """The entries of some (pipeline, step) pairs, with their pipeline; optionally of some keys."""
    pairs = [
        sa.and_(jobs.c.pipeline == pipeline, ledger_entries.c.step == step)
        for pipeline, step in steps
    ]
    query = (
        sa.select(ledger_entries, jobs.c.pipeline)
        .join(jobs, jobs.c.id == ledger_entries.c.job_id)
        .where(sa.or_(sa.false(), *pairs))
        .order_by(ledger_entries.c.key)
    )
    if keys is not None:
        query = query.where(ledger_entries.c.key.in_(keys))
    return query


# --- the protocol's combined statements: one round trip each -----------------------------


def claim_source(key: str, job_id: UUID, fingerprint: str) -> sa.Select[Any]:
    """One literal row (key, job_id, fingerprint) to claim from, when the job was read first."""
    row: list[ColumnElement[Any]] = [
        sa.literal(key),
        sa.literal(job_id, sa.Uuid()),
        sa.literal(fingerprint),
    ]
    # SQLite needs a WHERE in INSERT … SELECT … ON CONFLICT to parse it unambiguously.
    return sa.select(*row).where(sa.true())


def entry_after_record(key: str) -> FromClause:
    """The recorded entry's (key, step, attempts), for the statements that follow a record."""
    entry = ledger_entries.c
    return sa.select(entry.key, entry.step, entry.attempts).where(entry.key == key).subquery()


def record_step_in_one(
    finished: sa.Update,
    event: tuple[UUID, EventKind, float | None, JSON],
    job: tuple[JobState, str | None, tuple[str, JSON] | None],
) -> sa.Select[Any]:
    """Postgres: record a key, append its event and move the job on, in one statement.

    Returns (key, job state); no row when the fence rejected the owner.
    """
    job_id, kind, duration_ms, detail = event
    state, current_step, result = job
    finished_cte = finished.cte("finished")
    event_cte = append_event_after(finished_cte, job_id, kind, duration_ms, detail).cte("event")
    job_cte = advance_job(
        job_id, finished_cte, state=state, current_step=current_step, result=result
    ).cte("job")
    return (
        sa.select(finished_cte.c.key, job_cte.c.state)
        .select_from(finished_cte.outerjoin(job_cte, sa.true()))
        .add_cte(event_cte)
    )


def record_and_claim_next_in_one(
    finished: sa.Update,
    event: tuple[UUID, EventKind, float | None, JSON],
    result: tuple[str, JSON],
    *,
    next_step: str,
    owner: UUID,
    lease_seconds: float,
    takeover_expired: bool,
) -> sa.Select[Any]:
    """Postgres, the fast path: record a key, append its event, move the job to `next_step`
    and claim that step's key for `owner`, in one statement.

    Returns no row when the fence rejected the record; a `job_state` other than running
    when the job was no longer active (the result is recorded on it, as in the chained mode,
    but it does not move and nothing is claimed); otherwise the same columns as
    `claim_step_in_one`, for the next step.
    """
    job_id, kind, duration_ms, detail = event
    step, value = result
    finished_cte = finished.cte("finished")
    event_cte = append_event_after(finished_cte, job_id, kind, duration_ms, detail).cte("event")
    active = jobs.c.state.in_(ACTIVE)
    next_key = jobs.c.step_keys[param("step_key", next_step, sa.JSON.JSONStrIndexType())]
    job = (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", job_id, sa.Uuid()),
            sa.exists(sa.select(sa.literal(1)).select_from(finished_cte)),
        )
        .values(
            results=db.json_set_key(
                jobs.c.results,
                param("result_step", step, sa.String()),
                param("result", value, JSONDocument),
            ),
            current_step=sa.case(
                (active, param("step", next_step, sa.String())), else_=jobs.c.current_step
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
        .cte("job")
    )
    claimed, existing, columns = claim_from(
        job,
        step=next_step,
        owner=owner,
        lease_seconds=lease_seconds,
        takeover_expired=takeover_expired,
    )
    return (
        sa.select(
            finished_cte.c.key.label("recorded_key"),
            job.c.state.label("job_state"),
            *columns,
        )
        .select_from(
            finished_cte.outerjoin(job, sa.true())
            .outerjoin(claimed, sa.true())
            .outerjoin(existing, existing.c.key == job.c.key)
        )
        .add_cte(event_cte)
    )
