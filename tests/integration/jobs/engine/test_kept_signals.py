"""Kept signals have a lifetime (Postgres and SQLite): a wait takes one received within
`ONCELERY_SIGNAL_KEEP_FOR` only, status counts the takeable ones, and `prune` deletes the
expired ones and those taken before its horizon, in batches."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa

from jobs.engine.run import run_step
from jobs.engine.runtime import Runtime
from jobs.ops.status import signals_view
from ledger import JobState, SignalLedger
from ledger.schema import signals
from tests.factories import RecordingDispatch
from tests.integration.jobs.engine.test_signal_waits import (
    reach_wait,
    signal,
    signal_rows,
    start,
    timer_of,
    waiting,
)

DAY = 86_400.0


def age(engine: sa.Engine, signal_id: str, *, by: timedelta, consumed: bool = False) -> None:
    """Make a signal's row as old as if it had come `by` ago (and been taken then)."""
    with engine.begin() as conn:
        row = conn.execute(sa.select(signals).where(signals.c.signal_id == signal_id)).one()
        values = {"received_at": row.received_at - by}
        if consumed:
            values["consumed_at"] = row.consumed_at - by
        conn.execute(sa.update(signals).where(signals.c.id == row.id).values(**values))


def test_a_wait_takes_no_signal_kept_past_its_lifetime(runtime: Runtime) -> None:
    """The review's case: a late `shipped` kept after its wait timed out must not end, a week
    later, another wait of the same name and key."""
    pipeline, dispatch = waiting(), RecordingDispatch()
    word = uuid.uuid4().hex
    signal(runtime, dispatch, word, "stale")
    signal(runtime, dispatch, word, "fresh")
    age(runtime.engine, "stale", by=timedelta(days=8))
    assert signals_view(runtime.signals) == {"waiting_jobs": 0, "kept": 1}
    assert runtime.signals.expired() == 1
    first, second = start(runtime, pipeline, word), start(runtime, pipeline, word)

    reach_wait(runtime, dispatch, pipeline, first)

    # The fresh one, though the stale one is older.
    job = runtime.store.get_job(uuid.UUID(first))
    assert job.results["wait"]["signal_id"] == "fresh"  # type: ignore[index,call-overload]
    dispatch.sent.clear()
    # (Another event for the same word: its first step adopts the first job's result.)
    run_step(runtime, dispatch, pipeline, pipeline.step("first"), second)  # type: ignore[arg-type]
    assert dispatch.sent == []
    assert timer_of(runtime.engine, second).state == "pending"  # waits: nothing takeable
    assert runtime.store.get_job(uuid.UUID(second)).current_step == "wait"
    stale = [row for row in signal_rows(runtime.engine) if row.signal_id == "stale"]
    assert [(row.job_id, row.consumed_at) for row in stale] == [(None, None)]
    assert signals_view(runtime.signals) == {"waiting_jobs": 1, "kept": 0}


def test_the_lifetime_is_the_setting(runtime: Runtime) -> None:
    pipeline, dispatch = waiting(), RecordingDispatch()
    word = uuid.uuid4().hex
    signal(runtime, dispatch, word, "an-hour-old")
    age(runtime.engine, "an-hour-old", by=timedelta(hours=1))
    runtime.ledger.signal_keep_for = 60.0
    job_id = start(runtime, pipeline, word)

    reach_wait(runtime, dispatch, pipeline, job_id)

    assert runtime.store.get_job(uuid.UUID(job_id)).current_step == "wait"
    assert SignalLedger(engine=runtime.engine, keep_for=60.0).counts() == (0, 1)
    assert SignalLedger(engine=runtime.engine).counts() == (1, 1)


def test_prune_deletes_expired_and_long_taken_signals_in_batches(runtime: Runtime) -> None:
    pipeline, dispatch = waiting(), RecordingDispatch()
    for name in ("expired-1", "expired-2", "expired-3", "kept"):
        signal(runtime, dispatch, uuid.uuid4().hex, name)
    for name in ("expired-1", "expired-2", "expired-3"):
        age(runtime.engine, name, by=timedelta(days=8))
    # Taken: one long ago and sent, one long ago with its publish still in the outbox (its
    # job waits for the sweeper's resend), one lately.
    for name, sent in (("taken-long-ago", True), ("unsent", False), ("taken-lately", True)):
        job_id = start(runtime, pipeline)
        reach_wait(runtime, dispatch, pipeline, job_id)
        word = str(runtime.store.get_job(uuid.UUID(job_id)).context["word"])
        signal(runtime, RecordingDispatch(fail=not sent), word, name)
        if name != "taken-lately":
            age(runtime.engine, name, by=timedelta(days=31), consumed=True)
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.RUNNING

    deleted = runtime.signals.prune(older_than=30 * DAY, batch=2)

    assert deleted == 4
    left = sorted(row.signal_id for row in signal_rows(runtime.engine))
    assert left == ["kept", "taken-lately", "unsent"]
    assert runtime.signals.expired() == 0
    assert runtime.signals.prune(older_than=30 * DAY, batch=2) == 0
    # Its id forgotten, an expired signal sent again is a new one, kept.
    again = signal(runtime, dispatch, uuid.uuid4().hex, "expired-1")
    assert again.outcome == "recorded"
