"""The records that set a timer in their own transaction (`StepLedger`'s): a success that
moves its job to a wait step (a sleep, or a wait for a signal, which may take a signal kept
for it instead), and a failed attempt whose retry waits as a timer.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger import db, queries
from ledger.outcomes import Failure, Record
from ledger.schema import jobs, timers
from ledger.signals import take_kept
from ledger.types import (
    ACTIVE_JOB_STATES,
    JSON,
    Claim,
    EventKind,
    JobState,
    Recorded,
    SignalWait,
    StepState,
    TimerKind,
)

if TYPE_CHECKING:
    from ledger.step_ledger import StepLedger


def record_and_wait(
    ledger: StepLedger,
    record: Record,
    wait_step: str,
    due: datetime | timedelta,
    wait: SignalWait | None,
) -> Recorded:
    """Record a success that moves its job to a wait step, and set the job's timer (or
    take the signal kept for it), in one transaction (the record's statements as on
    SQLite, on either database)."""
    finish, event, advance = queries.record_statements(*record.shape)
    values = record.values()
    job_id = record.claim.job_id

    def attempt() -> Mapping[str, Any] | None:
        with db.transaction(ledger.engine) as conn:
            if conn.execute(finish, record.finish_values()).one_or_none() is None:
                return None
            conn.execute(event, values)
            state: str = conn.execute(advance, values).scalar_one()
            if state != JobState.RUNNING:
                return {"state": state}
            taken = set_wait(conn, job_id, wait_step, due, wait, ledger.signal_keep_for)
            if taken is not None:
                return {"state": taken, "signalled": True}
            return {"state": state}

    found = ledger.retrying(attempt)
    recorded = ledger._recorded(record, found)
    if found is not None and found.get("signalled"):
        return Recorded(key=recorded.key, job_state=recorded.job_state, signalled=True)
    return recorded


def set_wait(
    conn: Connection,
    job_id: UUID,
    step: str,
    due: datetime | timedelta,
    wait: SignalWait | None,
    keep_for: float,
) -> JobState | None:
    """In the caller's transaction, for a job that just reached wait `step`: take the
    signal kept for it (within `keep_for` seconds), if it waits for one and one is (the
    job's state after moving on past the wait is returned); else set its timer and say so
    in its history (None)."""
    if wait is not None:
        taken = take_kept(conn, job_id, step, wait, keep_for)
        if taken is not None:
            return taken[0]
    dialect = conn.dialect.name
    kind = TimerKind.SLEEP if wait is None else TimerKind.SIGNAL_TIMEOUT
    signal = (wait.signal, wait.key) if wait is not None else None
    due_at: datetime | None = conn.execute(
        queries.insert_timer(dialect, job_id, step, kind, due, signal)
    ).scalar_one_or_none()
    if due_at is None:  # set already, by an earlier commit of this record
        return None
    until = db.as_utc(due_at).isoformat()
    if wait is None:
        detail: JSON = {"until": until}
        conn.execute(queries.append_event(job_id, step, EventKind.SLEEPING, detail=detail))
    else:
        detail = {"signal": wait.signal, "key": wait.key, "until": until}
        conn.execute(queries.append_event(job_id, step, EventKind.WAITING, detail=detail))
    return None


def record_and_arm_retry(
    ledger: StepLedger, claim: Claim, failure: Failure, retry_in: float
) -> Recorded:
    """Record a failed attempt whose retry waits as a timer, in one transaction: the key
    `failed`, the job still at its step, the step's retry timer set anew (a second long
    retry of the step replaces the first one's row), and the failure's event with the time
    it is due (`retry_at`).

    Raises:
        LeaseLost: another owner took the key over meanwhile.
    """
    record = Record(
        claim,
        entry=(StepState.FAILED, None, failure.error),
        event=(EventKind.FAILED, failure.duration_ms, None),
        job=(JobState.RUNNING, claim.step, None),
    )
    finish, event, advance = queries.record_statements(*record.shape)
    values = record.values()
    job_id, step = claim.job_id, claim.step

    def attempt() -> Mapping[str, Any] | None:
        with db.transaction(ledger.engine) as conn:
            # The timer's row first, as the timer loop locks it (then the job).
            conn.execute(queries.lock_timers(job_id, step, TimerKind.RETRY)).all()
            if conn.execute(finish, record.finish_values()).one_or_none() is None:
                return None
            state: str = conn.execute(advance, values).scalar_one()
            detail: dict[str, JSON] = {"error": failure.error, "retry_in": round(retry_in, 3)}
            if state == JobState.RUNNING:
                detail["retry_at"] = arm_retry(conn, job_id, step, retry_in).isoformat()
            conn.execute(event, {**values, "p_detail": detail})
            return {"state": state}

    return ledger._recorded(record, ledger.retrying(attempt))


def arm_retry(conn: Connection, job_id: UUID, step: str, retry_in: float) -> datetime:
    """Set a step's retry timer `retry_in` seconds from the database's clock, replacing the
    row an earlier long retry of the step left (in the caller's transaction); its due time."""
    conn.execute(queries.drop_timers(job_id, step, TimerKind.RETRY))
    due = timedelta(seconds=retry_in)
    insert = queries.insert_timer(conn.dialect.name, job_id, step, TimerKind.RETRY, due)
    return db.as_utc(conn.execute(insert).scalar_one())


def arm_wait(
    ledger: StepLedger,
    job_id: UUID,
    step: str,
    due: datetime | timedelta,
    wait: SignalWait | None,
) -> JobState | bool:
    """For a message of wait `step` (which no worker runs): if the job is at that wait with
    no pending timer — moved there without one (a person's `dlq resolve` of the step before,
    a replay of the wait's own dead letter) — arm it now, as the record that moves a job
    there would. True: the job waits (its timer was pending, or is set now); False: it is
    not at this wait (a stale copy, absorbed); a state: a kept signal moved it past the wait
    (its next step is the caller's to publish)."""
    timer = timers.c

    def attempt() -> JobState | bool:
        with db.transaction(ledger.engine) as conn:
            at = (
                sa.select(jobs.c.id)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.current_step == step,
                    jobs.c.state.in_([str(state) for state in ACTIVE_JOB_STATES]),
                )
                .with_for_update()
            )
            if conn.execute(at).one_or_none() is None:
                return False
            of_the_wait = (timer.job_id == job_id, timer.step == step)
            pending = sa.select(timer.id).where(*of_the_wait, timer.state == "pending")
            if conn.execute(pending.limit(1)).one_or_none() is not None:
                return True
            # A timer of an earlier pass (fired or cancelled while the job was elsewhere).
            conn.execute(sa.delete(timers).where(*of_the_wait, timer.state != "pending"))
            moved = set_wait(conn, job_id, step, due, wait, ledger.signal_keep_for)
            return moved if moved is not None else True

    return ledger.retrying(attempt)
