"""A job's timers end with it (Postgres and SQLite): a job dead-lettered while one is pending,
or cancelled while the record that sets one commits, leaves none pending to fire later (a
replay of its letter would otherwise get a second message of its step)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from jobs.engine.runtime import Runtime
from ledger import JSON, DeadLetterReason, JobState, TimerState, queries
from ledger.signals import KEEP_FOR
from ledger.timed_records import set_wait
from tests.integration.jobs.engine.test_retry_timers import (
    pipeline_failing,
    rows,
    start,
    waiting_to_retry,
)
from tests.waiting import wait_for


def test_dead_lettering_a_job_cancels_its_pending_timer(runtime: Runtime) -> None:
    _, _, job_id = waiting_to_retry(runtime)
    [row] = rows(runtime, job_id)
    assert row.state == TimerState.PENDING

    error: JSON = {"type": "Gone", "message": "a person must look", "retryable": False}
    runtime.ledger.dead_letter(
        uuid.UUID(job_id), "second", error, reason=DeadLetterReason.PERMANENT
    )

    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.DEAD_LETTERED
    [row] = rows(runtime, job_id)
    assert row.state == TimerState.CANCELLED
    assert runtime.timers.stats().pending["later"] == 0


def test_a_job_cancelled_while_its_record_sets_a_timer_keeps_none_pending(
    runtime: Runtime, database_url: str
) -> None:
    """The record moving the job to a wait holds the job's row with its timer written; the
    cancel's first look at the timers sees none, then waits for the row; the record commits
    and the cancel ends the job. (On SQLite, one writer: the two never overlap.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's one writer runs the record and the cancel one after the other")
    pipeline = pipeline_failing([])
    job = uuid.UUID(start(runtime, pipeline))
    cancelled: list[JobState] = []
    canceller = threading.Thread(
        target=lambda: cancelled.append(runtime.store.cancel(job, by="test").state)
    )
    with runtime.engine.connect() as conn, conn.begin():
        # The record's transaction, as `record_and_wait` runs it: the job moved to its wait
        # step ("second" stands for one here), the timer set with it.
        moved = queries.move_on_with_result(job, "first", {"word": "w"}, "second")
        assert conn.execute(moved).scalar_one() == JobState.RUNNING
        assert set_wait(conn, job, "second", timedelta(hours=1), None, KEEP_FOR) is None
        recorder: int = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
        canceller.start()
        blocked = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
        )

        def waits_for_the_record() -> bool:
            with runtime.engine.connect() as look:
                return bool(look.execute(blocked, {"pid": recorder}).scalar_one())

        wait_for(waits_for_the_record, "the cancel to wait for the job's row", timeout=10)
    canceller.join(timeout=10)

    assert cancelled == [JobState.CANCELLED]
    [row] = rows(runtime, str(job))
    assert row.state == TimerState.CANCELLED
