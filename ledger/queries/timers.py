"""The timers' statements: set a timer, fire the due ones (a compare-and-set on each row,
SKIP LOCKED), take a lost firing's publish from the outbox, cancel a job's timers, and count
them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries import wait_outbox
from ledger.queries.common import ACTIVE
from ledger.queries.wait_outbox import taken
from ledger.schema import jobs, timers
from ledger.types import JSON, EventKind, TimerKind, TimerState

_PENDING = str(TimerState.PENDING)
_FIRED = str(TimerState.FIRED)
#: `state = 'pending'` written out, not bound: the planner then matches the partial index
#: on pending timers whatever plan it caches for the statement.
_IS_PENDING = timers.c.state == sa.literal_column(f"'{_PENDING}'")


def insert_timer(
    dialect_name: str,
    job_id: UUID,
    step: str,
    kind: TimerKind,
    due: datetime | timedelta,
    signal: tuple[str, str] | None = None,
) -> Any:
    """Set a job's timer for `step`, due at a time or after a delay from the database's
    clock (a wait for a signal: with the signal's name and key); nothing if it has one of
    that kind already (a record repeated after an ambiguous commit). Returns its due time
    when set."""
    due_at = db.utcnow_plus(db.seconds(due.total_seconds())) if isinstance(due, timedelta) else due
    insert = db.insert_for(dialect_name)(timers).values(
        job_id=job_id,
        step=step,
        kind=str(kind),
        state=_PENDING,
        due_at=due_at,
        created_at=db.utcnow(),
        signal=signal[0] if signal else None,
        signal_key=signal[1] if signal else None,
    )
    conflict = insert.on_conflict_do_nothing(index_elements=["job_id", "step", "kind", "item_id"])
    return conflict.returning(timers.c.due_at)


def lock_timers(job_id: UUID, step: str, kind: TimerKind) -> sa.Select[Any]:
    """Lock a job's timer of `kind` for `step`, if it has one (before its job's row, as the
    timer loop locks them: a record that re-arms a retry timer while the loop fires it
    waits for the loop, rather than deadlock with it)."""
    return (
        sa.select(timers.c.id)
        .where(timers.c.job_id == job_id, timers.c.step == step, timers.c.kind == str(kind))
        .with_for_update()
    )


def drop_timers(job_id: UUID, step: str, kind: TimerKind) -> sa.Delete:
    """Delete a job's timer of `kind` for `step` (fired, or pending: re-armed): a firing
    still in the outbox then marks no row sent by mistake."""
    return sa.delete(timers).where(
        timers.c.job_id == job_id, timers.c.step == step, timers.c.kind == str(kind)
    )


def touch_retrying(job_id: UUID, step: str) -> sa.Update:
    """A retry timer fires: its job, if still active at `step`, counts as making progress
    (the sweeper would take a job untouched since its failure for stalled); returns its
    state."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE), jobs.c.current_step == step)
        .values(updated_at=db.utcnow())
        .returning(jobs.c.state)
    )


# The three statements of a round of firings on Postgres, each of fixed text whatever the
# round's size (its rows come as one JSON array): compiled once. Built with the rows in
# VALUES lists instead, their compilation took half the loop's time.
_ACTIVE_STATES = ", ".join(f"'{state}'" for state in ACTIVE)
_MOVE_MANY_ON = sa.text(
    """
    UPDATE jobs SET
        results = jobs.results || jsonb_build_object(moves.step, moves.woke),
        current_step = moves.next_step,
        state = CASE WHEN moves.next_step IS NULL THEN 'succeeded' ELSE 'running' END,
        updated_at = statement_timestamp(),
        finished_at = CASE WHEN moves.next_step IS NULL THEN statement_timestamp()
                           ELSE jobs.finished_at END
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS moves(job_id uuid, step text, next_step text, woke jsonb)
    WHERE jobs.id = moves.job_id AND jobs.state IN (ACTIVE_STATES)
      AND jobs.current_step = moves.step
    RETURNING jobs.id, jobs.state
    """.replace("ACTIVE_STATES", _ACTIVE_STATES)
)
_TOUCH_MANY_RETRYING = sa.text(
    """
    UPDATE jobs SET updated_at = statement_timestamp()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS due(job_id uuid, step text)
    WHERE jobs.id = due.job_id AND jobs.state IN (ACTIVE_STATES)
      AND jobs.current_step = due.step
    RETURNING jobs.id
    """.replace("ACTIVE_STATES", _ACTIVE_STATES)
)
_APPEND_FIRINGS = sa.text(
    """
    INSERT INTO step_events (job_id, step, key, attempt, kind, at, duration_ms, detail)
    SELECT fired.job_id, fired.step, NULL, NULL, fired.kind, statement_timestamp(), NULL,
           fired.detail
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS fired(job_id uuid, step text, kind text, detail jsonb)
    """
)


def move_many_on(
    moves: Sequence[tuple[UUID, str, str | None, JSON]],
) -> tuple[sa.TextClause, dict[str, Any]]:
    """Postgres: the jobs of fired sleep timers, each (job id, sleep step, next step, the
    wait's result), given the result and moved on to their next step (None: finished), if
    still active at the sleep step, in one statement (and its parameters); it returns the
    moved jobs (`id`) and their `state`. (One `move_on_with_result` a timer took a round
    trip and a compilation each: the loop fired 330 a second.)"""
    rows = [
        {"job_id": str(job_id), "step": step, "next_step": next_step, "woke": woke}
        for job_id, step, next_step, woke in moves
    ]
    return _MOVE_MANY_ON, {"rows": json.dumps(rows)}


def touch_many_retrying(
    retries: Sequence[tuple[UUID, str]],
) -> tuple[sa.TextClause, dict[str, Any]]:
    """Postgres: `touch_retrying` for the jobs of several fired retry timers, each (job id,
    step), in one statement (and its parameters); it returns the jobs touched (`id`)."""
    rows = [{"job_id": str(job_id), "step": step} for job_id, step in retries]
    return _TOUCH_MANY_RETRYING, {"rows": json.dumps(rows)}


def append_firings(
    events: Sequence[tuple[UUID, str, EventKind, JSON]],
) -> tuple[sa.TextClause, dict[str, Any]]:
    """Postgres: the history events of a round of firings (`woke`, `retry_due`), each (job
    id, step, kind, detail), in one statement (and its parameters)."""
    rows = [
        {"job_id": str(job_id), "step": step, "kind": str(kind), "detail": detail}
        for job_id, step, kind, detail in events
    ]
    return _APPEND_FIRINGS, {"rows": json.dumps(rows)}


def fire_due(dialect_name: str, limit: int, pipelines: Sequence[str]) -> sa.Update:
    """Fire up to `limit` pending timers due by now, earliest first, of jobs of `pipelines`:
    each row taken is locked (SKIP LOCKED: loops running at once take disjoint rows) and
    moved `pending` → `fired` only if still pending (the compare-and-set that fires it once,
    whatever the locking); returns the fired rows."""
    due = (
        sa.select(timers.c.id)
        .join(jobs, jobs.c.id == timers.c.job_id)
        .where(
            _IS_PENDING,
            timers.c.due_at <= db.utcnow(),
            jobs.c.pipeline.in_(list(pipelines)),
        )
        .order_by(timers.c.due_at)
        .limit(limit)
    )
    return (
        sa.update(timers)
        .where(timers.c.id.in_(taken(dialect_name, due, timers)), timers.c.state == _PENDING)
        .values(state=_FIRED, fired_at=db.utcnow())
        .returning(
            timers.c.id,
            timers.c.job_id,
            timers.c.step,
            timers.c.kind,
            timers.c.due_at,
            timers.c.fired_at,
            timers.c.item_id,
        )
    )


def select_waiting_jobs(job_ids: Sequence[UUID]) -> sa.Select[Any]:
    """What the firing of a job's timer needs of it."""
    return sa.select(
        jobs.c.id,
        jobs.c.pipeline,
        jobs.c.state,
        jobs.c.current_step,
        jobs.c.context,
        jobs.c.results,
    ).where(jobs.c.id.in_(list(job_ids)))


def mark_sent(timer_ids: Sequence[int]) -> sa.Update:
    """Note that the next step of fired timers reached the broker (they leave the outbox).
    Fired ones only: a retry timer re-armed meanwhile (its step ran and failed again before
    this firing's publish was noted) is pending, and stays out of the outbox."""
    return (
        sa.update(timers)
        .where(
            timers.c.id.in_(list(timer_ids)),
            timers.c.state == _FIRED,
            timers.c.dispatched_at.is_(None),
        )
        .values(dispatched_at=db.utcnow())
    )


def take_unsent(
    dialect_name: str, older_than: float, limit: int, pipelines: Sequence[str]
) -> sa.Update:
    """Take fired timers whose next step's publish is not known to have reached the broker
    for `older_than` seconds (the loop died between its commit and the publish), marking
    them sent (see `wait_outbox.take_unsent`; `again`: a retry's or a limit's timer, which
    sends its own step, or its map item, again)."""
    return wait_outbox.take_unsent(
        dialect_name,
        timers,
        moved_at=timers.c.fired_at,
        unsent=sa.and_(timers.c.state == _FIRED, timers.c.dispatched_at.is_(None)),
        again=timers.c.kind.in_([str(TimerKind.RETRY), str(TimerKind.LIMIT)]),
        item=timers.c.item_id,
        older_than=older_than,
        limit=limit,
        pipelines=pipelines,
    )


def retry_timer_pending(
    job_id: ColumnElement[Any], step: ColumnElement[Any]
) -> ColumnElement[bool]:
    """A job's step's retry waits as a pending timer: a claim must not take its failed key
    over (the retry fence, `queries.claims`), nor take its limits (`queries.limits`)."""
    timer = timers.c
    return sa.exists().where(
        timer.job_id == job_id,
        timer.step == step,
        timer.kind == str(TimerKind.RETRY),
        timer.state == _PENDING,
    )


def select_jobs_to_resend(job_ids: Sequence[UUID]) -> sa.Select[Any]:
    """The active jobs among `job_ids`, with the step each is at."""
    return sa.select(jobs.c.id, jobs.c.pipeline, jobs.c.current_step, jobs.c.state).where(
        jobs.c.id.in_(list(job_ids)), jobs.c.state.in_(ACTIVE)
    )


def cancel_timers(job_id: UUID) -> sa.Update:
    """Cancel a job's pending timers: they never fire."""
    return (
        sa.update(timers)
        .where(timers.c.job_id == job_id, timers.c.state == _PENDING)
        .values(state=str(TimerState.CANCELLED))
    )


def cancel_unlocked_timers(dialect_name: str, job_id: UUID) -> sa.Update:
    """Cancel a job's pending timers that no other transaction holds (SKIP LOCKED), for a
    transaction that holds the job's row already: a timer the loop holds is being fired, and
    its firing moves a job no longer active nowhere. (Waiting for it instead could deadlock:
    the loop locks the timer, then the job.)"""
    pending = sa.select(timers.c.id).where(timers.c.job_id == job_id, _IS_PENDING)
    return (
        sa.update(timers)
        .where(timers.c.id.in_(taken(dialect_name, pending, timers)), timers.c.state == _PENDING)
        .values(state=str(TimerState.CANCELLED))
    )


def waiting() -> sa.Exists:
    """The job has a pending timer at its current step: it waits, neither stalled nor lost
    (the sweeper leaves it to the timer loop). A retry timer left behind by a step that
    ran early after all (a redelivery) does not hide the job at its later steps."""
    return sa.exists().where(
        timers.c.job_id == jobs.c.id,
        timers.c.state == _PENDING,
        timers.c.step == jobs.c.current_step,
    )


def pending_by_due(bounds: Sequence[float], cap: int) -> sa.Select[Any]:
    """Pending timers counted by how far their due time is, each bucket at most `cap + 1`
    (more means "over `cap`"): bucket i (column `b<i>`) holds those due within `bounds[i]`
    seconds from now and past the bucket before; the last, the rest. Each a range of the
    partial index on pending timers, read no further than `cap + 1` entries, however many
    are pending."""
    edges: list[ColumnElement[Any] | None] = [
        None,
        *(db.utcnow_plus(db.seconds(bound)) for bound in bounds),
        None,
    ]
    counts = []
    for index, (low, high) in enumerate(itertools.pairwise(edges)):
        where = [_IS_PENDING]
        if low is not None:
            where.append(timers.c.due_at > low)
        if high is not None:
            where.append(timers.c.due_at <= high)
        some = sa.select(sa.literal(1)).select_from(timers).where(*where).limit(cap + 1)
        counted = sa.select(sa.func.count()).select_from(some.subquery())
        counts.append(counted.scalar_subquery().label(f"b{index}"))
    return sa.select(*counts)


def count_waiting_jobs(cap: int) -> sa.Select[Any]:
    """Active jobs waiting on a pending timer at their current step (as `waiting`), at most
    `cap + 1`: read in due order from the partial index on pending timers, each timer's job
    looked up by its key, until `cap + 1` are found."""
    waiting_job = sa.exists().where(
        jobs.c.id == timers.c.job_id,
        jobs.c.state.in_(ACTIVE),
        jobs.c.current_step == timers.c.step,
    )
    some = (
        sa.select(sa.literal(1))
        .select_from(timers)
        .where(_IS_PENDING, waiting_job)
        .order_by(timers.c.due_at)
        .limit(cap + 1)
    )
    return sa.select(sa.func.count()).select_from(some.subquery())


def count_fired_since(window: float, cap: int) -> sa.Select[Any]:
    """Timers fired in the last `window` seconds, at most `cap + 1`."""
    some = (
        sa.select(sa.literal(1))
        .select_from(timers)
        .where(
            timers.c.fired_at.is_not(None),
            timers.c.fired_at >= db.utcnow_plus(db.seconds(-window)),
        )
        .limit(cap + 1)
    )
    return sa.select(sa.func.count()).select_from(some.subquery())


def recent_lateness(window: float, limit: int) -> sa.Select[Any]:
    """The lateness (fired − due, in seconds) of the timers fired in the last `window`
    seconds, the latest `limit` of them."""
    return (
        sa.select(db.seconds_between(timers.c.fired_at, timers.c.due_at).label("late"))
        .where(
            timers.c.fired_at.is_not(None),
            timers.c.fired_at >= db.utcnow_plus(db.seconds(-window)),
        )
        .order_by(timers.c.fired_at.desc())
        .limit(limit)
    )
