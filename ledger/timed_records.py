"""The records that set a timer in their own transaction (`StepLedger`'s): a success that
moves its job to a sleep step, and a failed attempt whose retry waits as a timer. Must not
import celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy.engine import Connection

from ledger import db, queries
from ledger.outcomes import Failure, Record
from ledger.types import JSON, Claim, EventKind, JobState, Recorded, StepState, TimerKind

if TYPE_CHECKING:
    from ledger.step_ledger import StepLedger


def record_and_sleep(
    ledger: StepLedger, record: Record, sleep_step: str, due: datetime | timedelta
) -> Recorded:
    """Record a success that moves its job to a sleep step, and set the job's timer, in one
    transaction (the record's statements as on SQLite, on either database)."""
    finish, event, advance = queries.record_statements(*record.shape)
    values = record.values()
    job_id = record.claim.job_id

    def attempt() -> Mapping[str, Any] | None:
        with db.transaction(ledger.engine) as conn:
            if conn.execute(finish, record.finish_values()).one_or_none() is None:
                return None
            conn.execute(event, values)
            state: str = conn.execute(advance, values).scalar_one()
            if state == JobState.RUNNING:
                set_sleep(conn, job_id, sleep_step, due)
            return {"state": state}

    return ledger._recorded(record, ledger.retrying(attempt))


def set_sleep(conn: Connection, job_id: UUID, step: str, due: datetime | timedelta) -> None:
    """Set a job's sleep timer and say so in its history (in the caller's transaction)."""
    dialect = conn.dialect.name
    due_at: datetime | None = conn.execute(
        queries.insert_timer(dialect, job_id, step, TimerKind.SLEEP, due)
    ).scalar_one_or_none()
    if due_at is None:  # set already, by an earlier commit of this record
        return
    until: JSON = {"until": db.as_utc(due_at).isoformat()}
    conn.execute(queries.append_event(job_id, step, EventKind.SLEEPING, detail=until))


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
