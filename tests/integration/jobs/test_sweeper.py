"""The sweeper on the real ledger (Postgres and SQLite): a job behind a backlog is not taken
for a lost one, and a lost one is still found once the messages ahead of it are gone."""

from __future__ import annotations

import uuid

import pytest

from jobs.pipelines import Pipeline, Step, StepContext
from jobs.runtime import Runtime
from jobs.sweeper import MAX_BACKLOG_WAIT, PACE_WINDOW, backlog_wait, sweep
from ledger import EventKind
from ledger.queries import append_events
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
