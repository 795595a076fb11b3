"""The sweeper on the real ledger (Postgres and SQLite): a job behind a backlog is not taken
for a lost one, and a lost one is still found once the messages ahead of it are gone; a job
whose step's owner died, or whose message a broker lost, is sent again at once."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import (
    ABANDONED_AGAIN_AFTER_LEASES,
    MAX_BACKLOG_WAIT,
    PACE_WINDOW,
    BlindWatch,
    QueueLoss,
    backlog_wait,
    sweep,
)
from jobs.pipelines import Pipeline, Step, StepContext
from ledger import Claim, EventKind, StepLedger
from ledger.queries import append_events
from ledger.schema import ledger_entries
from tests.factories import RecordingDispatch, create_job
from tests.integration.ledger.test_store import age

STALLED_AFTER = 60.0


def _noop(_ctx: StepContext[None]) -> None:
    return None


@pytest.fixture
def pipeline() -> Pipeline[None]:
    return Pipeline(
        name=f"sweep-{uuid.uuid4().hex[:8]}",
        steps=[Step("first", _noop, key="s:{base}:first"), Step("second", _noop, key="s:{base}:s")],
        resources=lambda _settings: None,
    )


def deliveries(runtime: Runtime, count: int) -> None:
    """Record `count` steps handled just now (what workers write as they go)."""
    events = [(create_job(runtime.store), "first") for _ in range(count)]
    with runtime.engine.begin() as conn:
        conn.execute(append_events(events, EventKind.SUCCEEDED, {}))


def test_nothing_queued_adds_no_wait(runtime: Runtime) -> None:
    assert backlog_wait(runtime, 0, STALLED_AFTER) == 0.0


def test_a_short_queue_adds_its_drain_time(runtime: Runtime) -> None:
    # Given workers that handled 30 messages in the last minute (0.5 a second)
    deliveries(runtime, 30)

    # Then 20 queued messages add the 40 seconds they need
    assert backlog_wait(runtime, 20, STALLED_AFTER) == pytest.approx(20 * PACE_WINDOW / 30)


def test_a_queue_longer_than_a_stall_is_a_backlog(runtime: Runtime) -> None:
    deliveries(runtime, 30)

    assert backlog_wait(runtime, 120, STALLED_AFTER) == MAX_BACKLOG_WAIT


def test_a_queue_nobody_drains_is_a_backlog(runtime: Runtime) -> None:
    assert backlog_wait(runtime, 5, STALLED_AFTER) == MAX_BACKLOG_WAIT


def test_a_job_behind_a_backlog_is_not_sent_again(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for 10 minutes, behind 300 messages drained at 1 a second
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 600)
    deliveries(runtime, int(PACE_WINDOW))
    dispatch = RecordingDispatch()

    # When the sweeper runs with a 60 s threshold
    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 300)

    # Then it leaves the job to the queue
    assert report.backlog_wait == MAX_BACKLOG_WAIT
    assert dispatch.sent == []


def test_a_job_stalled_past_the_backlog_limit_is_sent_again(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for longer than a backlog may delay it
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], int(MAX_BACKLOG_WAIT + STALLED_AFTER) + 60)
    dispatch = RecordingDispatch()

    sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 300)

    assert [job for _, _, job in dispatch.sent] == [str(job_id)]


def test_a_lost_message_is_found_once_the_backlog_is_gone(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for 2 minutes, and the queue empty
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 120)
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 0)

    assert report.backlog_wait == 0.0
    assert dispatch.sent == [(pipeline.name, "first", str(job_id))]


def test_a_short_queue_delays_the_re_drive_by_its_drain_time(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given 30 messages queued at 1 a second: a job is stalled after 60 + 30 seconds
    waited, fresh = (create_job(runtime.store, pipeline=pipeline.name) for _ in range(2))
    age(runtime.engine, [waited], 100)
    age(runtime.engine, [fresh], 75)
    deliveries(runtime, int(PACE_WINDOW))
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 30)

    assert report.backlog_wait == pytest.approx(30.0)
    assert [job for _, _, job in dispatch.sent] == [str(waited)]


def test_an_unknown_queue_depth_defers_the_re_drives(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a stalled job, and a broker that cannot tell how much is queued (restarting)
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 600)
    dispatch = RecordingDispatch()

    deferred = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: None)
    later = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 0)

    # Then nothing is sent until it can tell, and the job is still found afterwards
    assert (deferred.redriven, deferred.deferred) == (0, True)
    assert later.job_ids == [str(job_id)]


def test_an_unknown_queue_depth_still_sends_what_waited_past_the_backlog_limit(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for longer than any backlog may delay it, and a broker that cannot
    # tell how much is queued
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], int(MAX_BACKLOG_WAIT + STALLED_AFTER) + 60)
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: None)

    # Then it is sent anyway: the wait is capped as for a backlog
    assert (report.deferred, report.job_ids) == (True, [str(job_id)])


def test_the_pace_on_the_fast_path_counts_messages_not_steps(fast: Runtime) -> None:
    # Given 30 jobs that each ran their three steps in one message in the last minute
    jobs = [create_job(fast.store) for _ in range(30)]
    events = [(job, step) for job in jobs for step in ("a", "b", "c")]
    with fast.engine.begin() as conn:
        conn.execute(append_events(events, EventKind.SUCCEEDED, {}))

    # Then 20 queued messages need 40 s (30 messages a minute), not 13 s (90 events a minute)
    assert backlog_wait(fast, 20, STALLED_AFTER) == pytest.approx(20 * PACE_WINDOW / 30)


def claim(runtime: Runtime, job_id: uuid.UUID, *, expired: bool) -> None:
    """Claim the job's first step for 30 s; `expired`: 40 s ago (its owner died since)."""
    claimed = StepLedger(engine=runtime.engine, lease_seconds=30).claim_step(job_id, "first")
    assert isinstance(claimed, Claim)
    if expired:
        age(runtime.engine, [job_id], 40)
        entry = ledger_entries.c
        with runtime.engine.begin() as conn:
            leased: datetime = conn.execute(
                sa.select(entry.locked_until).where(entry.key == claimed.key)
            ).scalar_one()
            conn.execute(
                sa.update(ledger_entries)
                .where(entry.key == claimed.key)
                .values(locked_until=leased - timedelta(seconds=40))
            )


def expired_long_ago(runtime: Runtime, job_id: uuid.UUID, passed: int) -> None:
    """Pretend `passed` seconds went by since the job was last touched, its step's lease
    expired well before that."""
    age(runtime.engine, [job_id], passed)
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.update(ledger_entries)
            .where(ledger_entries.c.job_id == job_id)
            .values(locked_until=ledger_entries.c.locked_until - timedelta(seconds=passed + 60))
        )


def test_a_job_whose_owner_died_is_sent_again_once_its_lease_expired(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job touched just now, whose step's lease expired: its owner is dead
    dead, alive = (create_job(runtime.store, pipeline=pipeline.name) for _ in range(2))
    claim(runtime, dead, expired=True)
    claim(runtime, alive, expired=False)
    dispatch = RecordingDispatch()

    # When the sweeper runs (the stall threshold is far off)
    first = sweep(runtime, dispatch, stalled_after=STALLED_AFTER)
    second = sweep(runtime, dispatch, stalled_after=STALLED_AFTER)

    # Then that job is sent at once, and once; the live owner's job is left alone
    assert (first.abandoned, first.job_ids) == (1, [str(dead)])
    assert second.redriven == 0
    assert dispatch.sent == [(pipeline.name, "first", str(dead))]


def test_an_abandoned_job_whose_re_drive_went_unclaimed_is_sent_again(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given an abandoned job re-driven once, whose re-drive nobody claimed (lost in turn)
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    claim(runtime, job_id, expired=True)
    dispatch = RecordingDispatch()
    assert sweep(runtime, dispatch, stalled_after=STALLED_AFTER).abandoned == 1

    # When a few leases pass with its key still expired (long before the re-drive), the
    # stall threshold far off
    passed = int(ABANDONED_AGAIN_AFTER_LEASES * runtime.settings.step_lease) + 1
    expired_long_ago(runtime, job_id, passed)
    again = sweep(runtime, dispatch, stalled_after=STALLED_AFTER)

    # Then it is sent again, at once
    assert (again.abandoned, again.job_ids) == (1, [str(job_id)])
    assert dispatch.sent == [(pipeline.name, "first", str(job_id))] * 2


def test_an_abandoned_job_behind_a_backlog_is_sent_at_once_but_not_again(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given an abandoned job, and queues longer than the workers drain in a stall
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    claim(runtime, job_id, expired=True)
    dispatch = RecordingDispatch()

    # When the sweeper runs, then again a few leases later with the job still unclaimed
    first = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 300)
    passed = int(ABANDONED_AGAIN_AFTER_LEASES * runtime.settings.step_lease) + 1
    expired_long_ago(runtime, job_id, passed)
    again = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 300)

    # Then it was sent at once (its owner is dead), but not again: its re-drive is most
    # likely queued behind the backlog, and one more each sweep would only lengthen it
    assert (first.abandoned, again.abandoned) == (1, 0)
    assert dispatch.sent == [(pipeline.name, "first", str(job_id))]


def test_a_step_whose_lease_runs_is_not_stalled(runtime: Runtime, pipeline: Pipeline[None]) -> None:
    # Given a job untouched for 10 minutes whose step is still held (its owner renews it)
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    claim(runtime, job_id, expired=False)
    age(runtime.engine, [job_id], 600)
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER)

    assert (report.redriven, dispatch.sent) == (0, [])


class Watch(BlindWatch):
    """What a broker watch reports: a loss once, until `seen`."""

    def __init__(self, loss: QueueLoss | None) -> None:
        self.loss = loss
        self.seen_times = 0

    def lost(self) -> QueueLoss | None:
        return self.loss

    def seen(self) -> None:
        self.seen_times += 1
        self.loss = None


def test_jobs_whose_message_the_broker_lost_are_sent_again_at_once(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a broker that restarted empty 30 s ago, and jobs handed to it before and after
    before, after, held, outbox = (
        create_job(runtime.store, pipeline=pipeline.name) for _ in range(4)
    )
    runtime.store.mark_dispatched([before, after, held])
    claim(runtime, held, expired=False)
    age(runtime.engine, [before, held, outbox], 40)
    age(runtime.engine, [after], 20)
    watch = Watch(QueueLoss(before=30.0, after=None, reason="restarted"))
    dispatch = RecordingDispatch()

    # When the sweeper runs, twice
    first = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, watch=watch)
    second = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, watch=watch)

    # Then only the job sent before the loss, not in flight, is sent again, once
    assert (first.lost, first.job_ids, second.redriven) == (1, [str(before)], 0)
    assert watch.seen_times == 2
