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
from tests.factories import create_job
from tests.integration.jobs.conftest import RecordingDispatch
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
    assert backlog_wait(runtime, 0) == 0.0
    assert backlog_wait(runtime, None) == 0.0


def test_the_wait_is_the_queue_at_the_recent_pace(runtime: Runtime) -> None:
    # Given workers that handled 30 messages in the last minute (0.5 a second)
    deliveries(runtime, 30)

    # Then 120 queued messages need 240 seconds
    assert backlog_wait(runtime, 120) == pytest.approx(120 * PACE_WINDOW / 30)


def test_a_queue_nobody_drains_waits_the_longest(runtime: Runtime) -> None:
    assert backlog_wait(runtime, 5) == MAX_BACKLOG_WAIT


def test_a_job_behind_a_backlog_is_not_sent_again(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for 2 minutes, behind 300 messages drained at 1 a second
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 120)
    deliveries(runtime, int(PACE_WINDOW))
    dispatch = RecordingDispatch()

    # When the sweeper runs with a 60 s threshold
    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 300)

    # Then it waits out the backlog: 60 + 300 seconds
    assert report.backlog_wait == pytest.approx(300.0)
    assert dispatch.sent == []


def test_a_lost_message_is_found_once_the_backlog_is_gone(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given the same job, and the queue drained since
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 120)
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 0)

    assert report.backlog_wait == 0.0
    assert dispatch.sent == [(pipeline.name, "first", str(job_id))]


def test_a_long_stall_is_sent_again_even_behind_a_backlog(
    runtime: Runtime, pipeline: Pipeline[None]
) -> None:
    # Given a job untouched for 10 minutes, behind 30 messages at 1 a second
    job_id = create_job(runtime.store, pipeline=pipeline.name)
    age(runtime.engine, [job_id], 600)
    deliveries(runtime, int(PACE_WINDOW))
    dispatch = RecordingDispatch()

    report = sweep(runtime, dispatch, stalled_after=STALLED_AFTER, queued=lambda: 30)

    assert report.backlog_wait == pytest.approx(30.0)
    assert [job for _, _, job in dispatch.sent] == [str(job_id)]
