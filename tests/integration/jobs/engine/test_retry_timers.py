"""Long retries as timers on the real ledger (Postgres and SQLite), driven without Celery: a
`Retry-After` past the step's countdown limit is a timer row set with the failure's record,
fired once by the timer loop, re-armed by a second long retry, cancelled with its job, and
left alone by the sweeper."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import sweep
from jobs.engine.timers import fire_round
from jobs.errors import TransientError
from jobs.ops.history import history_view
from jobs.pipelines import Pipeline, Step, StepContext
from ledger import JSON, EventKind, JobState, TimerState
from ledger.schema import timers
from tests.factories import RecordingDispatch, RetryRequested

_names = itertools.count()
HOUR = 3600.0


def pipeline_failing(failures: list[Exception]) -> Pipeline[list[Exception]]:
    """first → second → third; `second` raises the failures given, one an attempt, then
    succeeds."""

    def first(ctx: StepContext[list[Exception]]) -> JSON:
        return {"word": ctx.context["word"]}

    def second(ctx: StepContext[list[Exception]]) -> JSON:
        if ctx.resources:
            raise ctx.resources.pop(0)
        return {"attempt": ctx.attempt}

    return Pipeline(
        name=f"retry-timer-{next(_names)}",
        steps=[
            Step("first", first, key="rt:{word}:first"),
            Step("second", second, key="rt:{word}:second"),
            Step("third", first, key="rt:{word}:third"),
        ],
        resources=lambda _settings: failures,
    )


def start(rt: Runtime, pipeline: Pipeline[Any]) -> str:
    new = pipeline.new_job(f"evt-{uuid.uuid4().hex}", {"word": uuid.uuid4().hex})
    [(job_id, _)] = rt.store.create_jobs([new])
    return str(job_id)


def rows(rt: Runtime, job_id: str) -> list[sa.Row[Any]]:
    with rt.engine.connect() as conn:
        query = sa.select(timers).where(timers.c.job_id == uuid.UUID(job_id))
        return list(conn.execute(query.order_by(timers.c.id)))


def run(
    rt: Runtime, dispatch: RecordingDispatch, pipeline: Pipeline[Any], step: str, job_id: str
) -> Outcome:
    return run_step(rt, dispatch, pipeline, pipeline.step(step), job_id)


def make_due(rt: Runtime, job_id: str) -> None:
    """Move the job's pending timers to now: the honest way not to wait an hour."""
    with rt.engine.begin() as conn:
        conn.execute(
            sa.update(timers)
            .where(timers.c.job_id == uuid.UUID(job_id), timers.c.state == "pending")
            .values(due_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def waiting_to_retry(rt: Runtime) -> tuple[Pipeline[list[Exception]], RecordingDispatch, str]:
    """A job whose `second` a 429 turned away for an hour: its retry waits as a timer."""
    failures: list[Exception] = [TransientError("429", retry_after=HOUR)]
    pipeline, dispatch = pipeline_failing(failures), RecordingDispatch()
    job_id = start(rt, pipeline)
    run(rt, dispatch, pipeline, "first", job_id)
    assert run(rt, dispatch, pipeline, "second", job_id) is Outcome.RETRYING
    return pipeline, dispatch, job_id


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_a_long_retry_after_is_a_timer_fired_once_and_re_armed_by_the_next(
    runtime: Runtime,
) -> None:
    failures: list[Exception] = [
        TransientError("429", retry_after=HOUR),
        TransientError("429", retry_after=2 * HOUR),
    ]
    pipeline, dispatch = pipeline_failing(failures), RecordingDispatch()
    job_id = start(runtime, pipeline)
    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.SUCCEEDED
    dispatch.sent.clear()
    before = datetime.now(UTC)

    # A 429 asking for an hour: no message (no countdown), one timer row, honoured in full
    outcome = run(runtime, dispatch, pipeline, "second", job_id)

    assert (outcome, dispatch.sent) == (Outcome.RETRYING, [])
    [row] = rows(runtime, job_id)
    assert (row.step, row.kind, row.state) == ("second", "retry", "pending")
    due = as_utc(row.due_at)
    assert before + timedelta(seconds=HOUR) <= due <= datetime.now(UTC) + timedelta(seconds=HOUR)
    view = history_view(runtime.store.history(uuid.UUID(job_id)))
    assert view["waiting"] == f"retrying at {due.isoformat()}"
    steps: Any = view["steps"]
    assert [step["state"] for step in steps] == ["succeeded", "retrying", "not_started"]
    assert runtime.timers.stats().waiting_jobs == 1
    # the sweeper leaves the waiting job alone, however long it has not moved
    assert sweep(runtime, dispatch, stalled_after=0.0).redriven == 0
    assert fire_round(runtime, dispatch) == 0  # not due

    # When it is due, it fires once: the step is sent again, on the retry queue
    make_due(runtime, job_id)
    assert fire_round(runtime, dispatch) == 1
    assert fire_round(runtime, dispatch) == 0
    assert (dispatch.sent, dispatch.resent) == ([(pipeline.name, "second", job_id)], [job_id])
    assert history_view(runtime.store.history(uuid.UUID(job_id)))["waiting"] is None
    # and, fired, the job is not stalled for the sweeper: the firing touched it
    assert sweep(runtime, dispatch, stalled_after=5.0).redriven == 0
    first_id = rows(runtime, job_id)[0].id

    # A second long retry of the same step re-arms the row: one timer, pending again
    outcome = run(runtime, dispatch, pipeline, "second", job_id)

    assert outcome is Outcome.RETRYING
    [row] = rows(runtime, job_id)
    assert (row.state, row.dispatched_at, row.fired_at) == ("pending", None, None)
    # the first firing's publish, noted late, leaves the re-armed timer alone
    runtime.timers.mark_sent([first_id])
    assert rows(runtime, job_id)[0].dispatched_at is None
    assert as_utc(row.due_at) >= before + timedelta(seconds=2 * HOUR)

    make_due(runtime, job_id)
    assert fire_round(runtime, dispatch) == 1
    outcome = run(runtime, dispatch, pipeline, "second", job_id)
    assert outcome is Outcome.SUCCEEDED
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.current_step, job.results["second"]) == ("third", {"attempt": 3})
    kinds = [e.kind for e in runtime.store.history(job.id).events if e.step == "second"]
    assert kinds == [
        EventKind.FAILED,
        EventKind.RETRY_DUE,
        EventKind.FAILED,
        EventKind.RETRY_DUE,
        EventKind.SUCCEEDED,
    ]


def test_a_short_retry_after_stays_a_countdown(runtime: Runtime) -> None:
    # The runtime's policy caps backoff at 1 s: 0.8 s is within it.
    failures: list[Exception] = [TransientError("429", retry_after=0.8)]
    pipeline, dispatch = pipeline_failing(failures), RecordingDispatch()
    job_id = start(runtime, pipeline)
    run(runtime, dispatch, pipeline, "first", job_id)

    with pytest.raises(RetryRequested) as countdown:
        run(runtime, dispatch, pipeline, "second", job_id)
    assert countdown.value.delay == 0.8
    assert rows(runtime, job_id) == []


def test_on_the_fast_path_a_long_retry_is_a_timer_too(fast: Runtime) -> None:
    failures: list[Exception] = [TransientError("429", retry_after=HOUR)]
    pipeline, dispatch = pipeline_failing(failures), RecordingDispatch()
    job_id = start(fast, pipeline)

    # first succeeds and goes straight on to second, which fails: no message either way
    outcome = run(fast, dispatch, pipeline, "first", job_id)

    assert (outcome, dispatch.sent) == (Outcome.RETRYING, [])
    [row] = rows(fast, job_id)
    assert (row.step, row.kind, row.state) == ("second", "retry", "pending")
    make_due(fast, job_id)
    assert fire_round(fast, dispatch) == 1
    assert dispatch.resent == [job_id]
    assert run(fast, dispatch, pipeline, "second", job_id) is Outcome.SUCCEEDED


def test_cancelling_a_job_waiting_to_retry_cancels_its_timer(runtime: Runtime) -> None:
    _, dispatch, job_id = waiting_to_retry(runtime)

    assert runtime.store.cancel(uuid.UUID(job_id), by="test").state is JobState.CANCELLED

    [row] = rows(runtime, job_id)
    assert row.state == TimerState.CANCELLED
    make_due(runtime, job_id)
    assert fire_round(runtime, dispatch) == 0
    assert history_view(runtime.store.history(uuid.UUID(job_id)))["waiting"] is None


def test_a_stray_copy_of_the_step_is_absorbed_while_its_retry_timer_is_pending(
    runtime: Runtime,
) -> None:
    """A redelivery (a worker killed between the failure's commit and its ack, a duplicate
    publish) before the timer is due: the step is not run before its `Retry-After`, its
    attempt not counted; the timer's firing sends it."""
    pipeline, dispatch, job_id = waiting_to_retry(runtime)
    dispatch.sent.clear()

    assert run(runtime, dispatch, pipeline, "second", job_id) is Outcome.INACTIVE

    assert dispatch.sent == []
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "second")
    [row] = rows(runtime, job_id)
    assert row.state == TimerState.PENDING
    assert sweep(runtime, dispatch, stalled_after=0.0).redriven == 0  # it waits
    make_due(runtime, job_id)
    assert fire_round(runtime, dispatch) == 1
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    dispatch.sent.clear()
    assert run(runtime, dispatch, pipeline, "second", job_id) is Outcome.SUCCEEDED
    assert dispatch.sent == [(pipeline.name, "third", job_id)]
    result = runtime.store.get_job(uuid.UUID(job_id)).results["second"]
    assert result == {"attempt": 2}  # the absorbed copy counted no attempt
