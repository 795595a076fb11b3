"""The step protocol's statements: creating and reading jobs, claiming and recording keys, and
the append-only history."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import BindParameter, ColumnElement, FromClause

from ledger import db
from ledger.schema import JSONDocument, jobs, ledger_entries, step_events
from ledger.types import ACTIVE_JOB_STATES, JSON, EventKind, JobState, StepState

ACTIVE = [str(state) for state in ACTIVE_JOB_STATES]


def param(name: str, value: Any, type_: Any = None) -> BindParameter[Any]:
    """A named parameter with a value. A statement built from named parameters keeps its
    shape across calls, so the hot path builds it once (the `*_template` functions) and runs
    it with fresh values: building SQLAlchemy constructs costs more CPU than running them."""
    return sa.bindparam(f"p_{name}", value, type_=type_)


def json_value(value: JSON) -> ColumnElement[Any]:
    """A JSON document as a bound value (JSONB on Postgres)."""
    return sa.literal(value, JSONDocument)


# --- jobs -------------------------------------------------------------------------------------


def insert_jobs(dialect_name: str, rows: Sequence[Mapping[str, Any]]) -> Any:
    """Insert jobs, skipping events already seen; returns the ids of the rows inserted."""
    insert = db.insert_for(dialect_name)
    return (
        insert(jobs)
        .values(list(rows))
        .on_conflict_do_nothing(index_elements=[jobs.c.pipeline, jobs.c.event_id])
        .returning(jobs.c.id, jobs.c.pipeline, jobs.c.event_id)
    )


def select_job_ids(pipeline: str, event_ids: Sequence[str]) -> sa.Select[Any]:
    """The job ids of the given events of one pipeline."""
    return sa.select(jobs.c.id, jobs.c.event_id).where(
        jobs.c.pipeline == pipeline, jobs.c.event_id.in_(event_ids)
    )


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


def start_job(job_id: UUID, step: str) -> sa.Update:
    """Mark a job that may still run as running; returns what its step needs."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == param("job_id", job_id, sa.Uuid()), jobs.c.state.in_(ACTIVE))
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
            jobs.c.step_keys[param("step_key", step, sa.JSON.JSONStrIndexType())]
            .as_string()
            .label("key"),
        )
    )


def advance_job(
    job_id: UUID,
    after: FromClause,
    *,
    state: JobState,
    current_step: str | None,
    result: tuple[str, JSON] | None,
) -> sa.Update:
    """Move an active job on, if `after` (the fenced ledger update) has a row; returns its state.

    A job cancelled or dead-lettered meanwhile keeps its state, step and finish time: the step's
    result is still recorded (in its entry and the job's results, so it is reported), but the
    job does not move.
    """
    active = jobs.c.state.in_(ACTIVE)
    values: dict[str, Any] = {
        "state": sa.case((active, param("job_state", str(state), sa.String())), else_=jobs.c.state),
        "current_step": sa.case(
            (active, param("current_step", current_step, sa.String())), else_=jobs.c.current_step
        ),
        "updated_at": db.utcnow(),
    }
    if state not in ACTIVE_JOB_STATES:
        values["finished_at"] = sa.case((active, db.utcnow()), else_=jobs.c.finished_at)
    if result is not None:
        step, value = result
        values["results"] = db.json_set_key(
            jobs.c.results,
            param("result_step", step, sa.String()),
            param("result", value, JSONDocument),
        )
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", job_id, sa.Uuid()),
            sa.exists(sa.select(sa.literal(1)).select_from(after)),
        )
        .values(values)
        .returning(jobs.c.state)
    )


def adopt_result(job_id: UUID, step: str, value: JSON, next_step: str | None) -> sa.Update:
    """Give an active job a result another job recorded under the same key; returns its state."""
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
        .where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE))
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


# --- ledger entries ---------------------------------------------------------------------------


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
    claimed = claim_step(
        "postgresql",
        # A job whose plan lacks the step claims nothing (the caller raises StepNotInJob).
        sa.select(job.c.key, job.c.id, job.c.fingerprint).where(job.c.key.is_not(None)),
        step=step,
        owner=owner,
        lease_seconds=lease_seconds,
        takeover_expired=takeover_expired,
    ).cte("claimed")
    # The entry as it stood when the statement began: what the claim found if it lost.
    existing = ledger_entries.alias("existing")
    return sa.select(
        job.c.context,
        job.c.results,
        job.c.key,
        job.c.fingerprint,
        job.c.current_step,
        claimed.c.attempts.label("claimed_attempts"),
        *_entry_columns(existing),
    ).select_from(
        job.outerjoin(claimed, sa.true()).outerjoin(existing, existing.c.key == job.c.key)
    )


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


def finish_entry(
    key: str, owner: UUID, *, state: StepState, result: JSON, error: JSON
) -> sa.Update:
    """Record an owner's outcome on its key, fenced by the owner token; returns the entry."""
    entry = ledger_entries.c
    failed = state is not StepState.SUCCEEDED
    return (
        sa.update(ledger_entries)
        .where(
            entry.key == param("record_key", key, sa.String()),
            entry.owner == param("record_owner", owner, sa.Uuid()),
            entry.state == str(StepState.STARTED),
        )
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


# --- history ----------------------------------------------------------------------------------


def append_event_after(
    after: FromClause, job_id: UUID, kind: EventKind, duration_ms: float | None, detail: JSON
) -> sa.Insert:
    """Append a history event for the entry `after` yields (nothing if it yields no row)."""
    source = sa.select(
        param("job_id", job_id, sa.Uuid()),
        after.c.step,
        after.c.key,
        after.c.attempts,
        sa.literal(str(kind)),
        db.utcnow(),
        param("duration_ms", duration_ms, sa.Float()),
        param("detail", detail, JSONDocument),
    ).select_from(after)
    columns = ["job_id", "step", "key", "attempt", "kind", "at", "duration_ms", "detail"]
    return sa.insert(step_events).from_select(columns, source).returning(step_events.c.id)


def append_event(
    job_id: UUID,
    step: str,
    kind: EventKind,
    *,
    key: str | None = None,
    attempt: int | None = None,
    duration_ms: float | None = None,
    detail: JSON = None,
) -> sa.Insert:
    """Append one history event."""
    return sa.insert(step_events).values(
        job_id=job_id,
        step=step,
        key=key,
        attempt=attempt,
        kind=str(kind),
        at=db.utcnow(),
        duration_ms=duration_ms,
        detail=json_value(detail) if detail is not None else sa.null(),
    )


def append_events(
    jobs_and_steps: Sequence[tuple[UUID, str]], kind: EventKind, detail: JSON
) -> sa.Insert:
    """Append the same event to several jobs' histories at once."""
    rows = [
        {
            "job_id": job_id,
            "step": step,
            "key": None,
            "attempt": None,
            "kind": str(kind),
            "at": db.utcnow(),
            "duration_ms": None,
            "detail": detail,
        }
        for job_id, step in jobs_and_steps
    ]
    return sa.insert(step_events).values(rows)


def select_events(job_id: UUID) -> sa.Select[Any]:
    """A job's history, oldest first."""
    return sa.select(step_events).where(step_events.c.job_id == job_id).order_by(step_events.c.id)


def count_events(kind: EventKind, job_ids: Sequence[UUID] | None = None) -> sa.Select[Any]:
    """How many events of a kind were appended, optionally for some jobs only."""
    query = sa.select(sa.func.count()).where(step_events.c.kind == str(kind))
    if job_ids is not None:
        query = query.where(step_events.c.job_id.in_(job_ids))
    return query


# --- the protocol's combined statements ---------------------------------------------------------


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

    Returns no row when the fence rejected the record; `job_state` is NULL when the job was no
    longer active (the record stands, nothing is claimed); otherwise the same columns as
    `claim_step_in_one`, for the next step.
    """
    job_id, kind, duration_ms, detail = event
    step, value = result
    finished_cte = finished.cte("finished")
    event_cte = append_event_after(finished_cte, job_id, kind, duration_ms, detail).cte("event")
    job = (
        sa.update(jobs)
        .where(
            jobs.c.id == param("job_id", job_id, sa.Uuid()),
            jobs.c.state.in_(ACTIVE),
            sa.exists(sa.select(sa.literal(1)).select_from(finished_cte)),
        )
        .values(
            results=db.json_set_key(
                jobs.c.results,
                param("result_step", step, sa.String()),
                param("result", value, JSONDocument),
            ),
            current_step=param("step", next_step, sa.String()),
            state=str(JobState.RUNNING),
            updated_at=db.utcnow(),
        )
        .returning(
            jobs.c.id,
            jobs.c.state,
            jobs.c.context,
            jobs.c.results,
            jobs.c.fingerprint,
            jobs.c.current_step,
            jobs.c.step_keys[param("step_key", next_step, sa.JSON.JSONStrIndexType())]
            .as_string()
            .label("key"),
        )
        .cte("job")
    )
    claimed = claim_step(
        "postgresql",
        sa.select(job.c.key, job.c.id, job.c.fingerprint).where(job.c.key.is_not(None)),
        step=next_step,
        owner=owner,
        lease_seconds=lease_seconds,
        takeover_expired=takeover_expired,
    ).cte("claimed")
    existing = ledger_entries.alias("existing")
    return (
        sa.select(
            finished_cte.c.key.label("recorded_key"),
            job.c.state.label("job_state"),
            job.c.context,
            job.c.results,
            job.c.key,
            job.c.fingerprint,
            job.c.current_step,
            claimed.c.attempts.label("claimed_attempts"),
            *_entry_columns(existing),
        )
        .select_from(
            finished_cte.outerjoin(job, sa.true())
            .outerjoin(claimed, sa.true())
            .outerjoin(existing, existing.c.key == job.c.key)
        )
        .add_cte(event_cte)
    )


# --- the hot path's statements, built once per shape ---------------------------------------

#: A placeholder for the parameters a template is built with (each run passes real ones).
_ANY = UUID(int=0)


@functools.cache
def claim_template(takeover_expired: bool) -> sa.Select[Any]:
    """`claim_step_in_one`, built once; run it with `claim_params`."""
    return claim_step_in_one(
        _ANY, step="", owner=_ANY, lease_seconds=0.0, takeover_expired=takeover_expired
    )


def claim_params(job_id: UUID, step: str, owner: UUID, lease_seconds: float) -> dict[str, Any]:
    """The parameters of `claim_template`."""
    return {
        "p_job_id": job_id,
        "p_step": step,
        "p_step_key": step,
        "p_owner": owner,
        "p_lease": lease_seconds,
    }


@functools.cache
def record_success_template(last: bool) -> sa.Select[Any]:
    """`record_step_in_one` for a success (of the last step, or not), built once; run it with
    `record_params`."""
    finished = finish_entry("", _ANY, state=StepState.SUCCEEDED, result={}, error=None)
    state = JobState.SUCCEEDED if last else JobState.RUNNING
    return record_step_in_one(
        finished, (_ANY, EventKind.SUCCEEDED, 0.0, {}), (state, None if last else "", ("", {}))
    )


@functools.cache
def record_retry_template() -> sa.Select[Any]:
    """`record_step_in_one` for a failed attempt to be retried, built once; run it with
    `record_params`."""
    finished = finish_entry("", _ANY, state=StepState.FAILED, result=None, error={})
    return record_step_in_one(
        finished, (_ANY, EventKind.FAILED, 0.0, {}), (JobState.RUNNING, "", None)
    )


@functools.cache
def record_and_claim_template(takeover_expired: bool) -> sa.Select[Any]:
    """`record_and_claim_next_in_one`, built once; run it with `record_params` and
    `claim_params` merged."""
    finished = finish_entry("", _ANY, state=StepState.SUCCEEDED, result={}, error=None)
    return record_and_claim_next_in_one(
        finished,
        (_ANY, EventKind.SUCCEEDED, 0.0, {}),
        ("", {}),
        next_step="",
        owner=_ANY,
        lease_seconds=0.0,
        takeover_expired=takeover_expired,
    )


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
    """The parameters of the record templates: the key and its owner, the event's duration
    and detail, the job's new state and step, the step's result or error."""
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
