"""Waits for a signal on the real ledger (Postgres and SQLite), driven without Celery: a
signal ends a wait and the job moves on; one sent before the wait is kept and taken by it; a
timeout that fired first keeps the signal unconsumed; a duplicate id changes nothing; one
signal ends one wait; a cancelled wait never takes one; a lost publish is resent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobs.engine.run import Outcome, run_step, run_steps
from jobs.engine.runtime import Runtime
from jobs.engine.signals import send_signal
from jobs.engine.sweeper import sweep
from jobs.engine.timers import fire_round
from jobs.ops.history import history_view
from jobs.ops.status import signals_view
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.waits import WaitForSignal
from ledger import JSON, EventKind, JobState, NewSignal, SignalOutcome
from ledger.schema import signals, timers
from tests.conftest import settings_for
from tests.factories import RecordingDispatch

_names = iter(range(10**6))


def _first(ctx: StepContext[None]) -> JSON:
    return {"word": ctx.context["word"]}


def _second(ctx: StepContext[None]) -> JSON:
    return {"after": ctx.results["wait"]}


def waiting(timeout: float = 3600.0) -> Pipeline[None]:
    return Pipeline(
        name=f"signalled-{next(_names)}",
        steps=[
            Step("first", _first, key="w:{word}:first"),
            WaitForSignal("wait", signal="shipped", key="{word}", timeout=timeout),
            Step("second", _second, key="w:{word}:second"),
        ],
        resources=lambda _settings: None,
    )


def start(rt: Runtime, pipeline: Pipeline[None], word: str | None = None) -> str:
    context = {"word": word or uuid.uuid4().hex}
    [(job_id, _)] = rt.store.create_jobs([pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)])
    return str(job_id)


def reach_wait(
    rt: Runtime, dispatch: RecordingDispatch, pipeline: Pipeline[None], job: str
) -> None:
    assert run_step(rt, dispatch, pipeline, pipeline.step("first"), job) is Outcome.SUCCEEDED  # type: ignore[arg-type]


def word_of(rt: Runtime, job_id: str) -> str:
    return str(rt.store.get_job(uuid.UUID(job_id)).context["word"])


def signal(
    rt: Runtime, dispatch: RecordingDispatch, key: str, signal_id: str, data: JSON = None
) -> Any:
    return send_signal(rt, dispatch, NewSignal("shipped", key, signal_id, data))


def timer_of(engine: sa.Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(timers).where(timers.c.job_id == uuid.UUID(job_id))).one()


def signal_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(signals).order_by(signals.c.id)))


def kinds(rt: Runtime, job_id: str) -> list[EventKind]:
    return [event.kind for event in rt.store.history(uuid.UUID(job_id)).events]


@pytest.mark.parametrize("fast_path", [False, True])
def test_a_signal_ends_the_wait_and_the_job_moves_on(
    runtime: Runtime, database_url: str, tmp_path: Path, fast_path: bool
) -> None:
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, fast_path=fast_path
    )
    pipeline, dispatch = waiting(), RecordingDispatch()
    job_id = start(runtime, pipeline)
    reach_wait(runtime, dispatch, pipeline, job_id)

    # Waiting: a timer row for the timeout, nothing published, the history says for what.
    assert dispatch.sent == []
    timer = timer_of(runtime.engine, job_id)
    word = word_of(runtime, job_id)
    assert (timer.kind, timer.state, timer.signal, timer.signal_key) == (
        "signal_timeout",
        "pending",
        "shipped",
        word,
    )
    due = timer.due_at if timer.due_at.tzinfo else timer.due_at.replace(tzinfo=UTC)
    view = history_view(runtime.store.history(uuid.UUID(job_id)))
    assert view["waiting"] == f"waiting for signal shipped (key {word}) until {due.isoformat()}"
    steps: Any = view["steps"]
    assert [step["state"] for step in steps] == ["succeeded", "waiting", "not_started"]
    assert signals_view(runtime.signals) == {"waiting_jobs": 1, "kept": 0}

    sent = signal(runtime, dispatch, word, "s-1", {"carrier": "DHL"})

    assert sent.outcome is SignalOutcome.RECORDED
    assert sent.woke is not None
    assert str(sent.woke.job_id) == job_id
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    assert timer_of(runtime.engine, job_id).state == "cancelled"  # never fires now
    [row] = signal_rows(runtime.engine)
    assert (str(row.job_id), row.step) == (job_id, "wait")
    assert row.consumed_at is not None
    assert row.dispatched_at is not None
    result = runtime.store.get_job(uuid.UUID(job_id)).results["wait"]
    assert isinstance(result, dict)
    assert (result["by"], result["signal_id"], result["data"]) == (
        "signal",
        "s-1",
        {"carrier": "DHL"},
    )
    assert result["due_at"] == due.isoformat()
    second = pipeline.step("second")
    outcome = run_step(runtime, dispatch, pipeline, second, job_id)  # type: ignore[arg-type]
    assert outcome is Outcome.SUCCEEDED
    view = history_view(runtime.store.history(uuid.UUID(job_id)))
    assert view["state"] == "succeeded"
    steps = view["steps"]
    assert steps[1]["state"] == "succeeded"
    assert kinds(runtime, job_id).count(EventKind.SIGNALLED) == 1
    assert signals_view(runtime.signals) == {"waiting_jobs": 0, "kept": 0}


def test_a_signal_sent_before_the_wait_is_kept_and_taken_when_the_job_gets_there(
    runtime: Runtime,
) -> None:
    pipeline, dispatch = waiting(), RecordingDispatch()
    word = uuid.uuid4().hex
    early = signal(runtime, dispatch, word, "early", {"n": 1})
    assert (early.outcome, early.woke) == (SignalOutcome.RECORDED, None)
    assert signals_view(runtime.signals) == {"waiting_jobs": 0, "kept": 1}
    job_id = start(runtime, pipeline, word)

    reach_wait(runtime, dispatch, pipeline, job_id)

    # Taken in the record's transaction: no timer at all, and the step after is published.
    with runtime.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(timers)).scalar_one() == 0
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "second")
    result = job.results["wait"]
    assert isinstance(result, dict)
    assert (result["by"], result["signal_id"], result["data"], result["due_at"]) == (
        "signal",
        "early",
        {"n": 1},
        None,
    )
    assert str(result["received_at"]) <= str(result["at"])
    [row] = signal_rows(runtime.engine)
    assert (str(row.job_id), row.dispatched_at is not None) == (job_id, True)
    assert kinds(runtime, job_id)[-2:] == [EventKind.WAITING, EventKind.SIGNALLED]
    assert signals_view(runtime.signals) == {"waiting_jobs": 0, "kept": 0}


def test_a_signal_after_the_timeout_fired_is_kept_and_changes_nothing(runtime: Runtime) -> None:
    pipeline, dispatch = waiting(timeout=0.0), RecordingDispatch()
    job_id = start(runtime, pipeline)
    reach_wait(runtime, dispatch, pipeline, job_id)
    assert fire_round(runtime, dispatch) == 1
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    before = runtime.store.get_job(uuid.UUID(job_id))

    late = signal(runtime, dispatch, word_of(runtime, job_id), "late")

    assert (late.outcome, late.woke) == (SignalOutcome.RECORDED, None)
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    after = runtime.store.get_job(uuid.UUID(job_id))
    assert (after.current_step, after.results) == (before.current_step, before.results)
    result = after.results["wait"]
    assert isinstance(result, dict)
    assert (result["by"], result["signal_id"], result["data"]) == ("timeout", None, None)
    assert timer_of(runtime.engine, job_id).state == "fired"
    [row] = signal_rows(runtime.engine)
    assert (row.job_id, row.consumed_at) == (None, None)  # kept for a wait to come
    assert EventKind.SIGNALLED not in kinds(runtime, job_id)
    assert kinds(runtime, job_id).count(EventKind.TIMED_OUT) == 1


def test_a_duplicate_signal_changes_nothing_and_one_signal_ends_one_wait(runtime: Runtime) -> None:
    """Two jobs wait for the same key: the oldest wait takes the signal; the same id again
    ends no other wait; a second id ends the second."""
    pipeline, dispatch = waiting(), RecordingDispatch()
    word = uuid.uuid4().hex
    older, newer = start(runtime, pipeline, word), start(runtime, pipeline, word)
    reach_wait(runtime, dispatch, pipeline, older)
    # (Another event for the same word: its first step adopts the older job's result.)
    run_step(runtime, dispatch, pipeline, pipeline.step("first"), newer)  # type: ignore[arg-type]
    assert signals_view(runtime.signals)["waiting_jobs"] == 2

    first = signal(runtime, dispatch, word, "s-1")
    again = signal(runtime, dispatch, word, "s-1")

    assert first.woke is not None
    assert str(first.woke.job_id) == older
    assert (again.outcome, again.woke) == (SignalOutcome.DUPLICATE, None)
    assert dispatch.sent == [(pipeline.name, "second", older)]
    assert timer_of(runtime.engine, newer).state == "pending"
    second = signal(runtime, dispatch, word, "s-2")
    assert second.woke is not None
    assert str(second.woke.job_id) == newer
    assert len(signal_rows(runtime.engine)) == 2


def test_a_cancelled_wait_takes_no_signal(runtime: Runtime) -> None:
    pipeline, dispatch = waiting(), RecordingDispatch()
    job_id = start(runtime, pipeline)
    reach_wait(runtime, dispatch, pipeline, job_id)

    cancelled = runtime.store.cancel(uuid.UUID(job_id), by="test")
    sent = signal(runtime, dispatch, word_of(runtime, job_id), "s-1")

    assert cancelled.state is JobState.CANCELLED
    assert timer_of(runtime.engine, job_id).state == "cancelled"
    assert (sent.outcome, sent.woke, dispatch.sent) == (SignalOutcome.RECORDED, None, [])
    assert signals_view(runtime.signals) == {"waiting_jobs": 0, "kept": 1}
    assert history_view(runtime.store.history(uuid.UUID(job_id)))["waiting"] is None


def test_the_step_after_a_signal_whose_publish_failed_is_resent_by_the_sweeper(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    pipeline, dispatch = waiting(), RecordingDispatch()
    job_id = start(runtime, pipeline)
    reach_wait(runtime, dispatch, pipeline, job_id)

    sent = send_signal(
        runtime, RecordingDispatch(fail=True), NewSignal("shipped", word_of(runtime, job_id), "s")
    )

    assert sent.woke is not None  # moved on, its publish left in the outbox
    [row] = signal_rows(runtime.engine)
    assert row.dispatched_at is None
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, relay_after=0.2
    )
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while not dispatch.sent and datetime.now(UTC) < deadline:
        report = sweep(runtime, dispatch, stalled_after=3600)
    assert (dispatch.sent, dispatch.resent) == ([(pipeline.name, "second", job_id)], [job_id])
    assert report.signals == 1
    assert sweep(runtime, dispatch, stalled_after=3600).signals == 0  # taken once


def test_a_wait_whose_key_cannot_be_told_dead_letters_the_job(runtime: Runtime) -> None:
    pipeline = Pipeline(
        name=f"signalled-{next(_names)}",
        steps=[
            Step("first", _first, key="w:{word}:first"),
            WaitForSignal("wait", signal="shipped", key=lambda context: "", timeout=60),
            Step("second", _second, key="w:{word}:second"),
        ],
        resources=lambda _settings: None,
    )
    job_id = start(runtime, pipeline)

    run_steps(runtime, RecordingDispatch(), pipeline, pipeline.step("first"), [job_id])  # type: ignore[arg-type]

    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.DEAD_LETTERED, "wait")


def test_a_job_put_at_its_wait_without_a_timer_takes_a_kept_signal_from_the_waits_message(
    runtime: Runtime,
) -> None:
    """A person's `dlq resolve` of the step before moves the job to the wait with no timer
    and sends the wait's message: it arms the wait, here by taking the signal kept for it."""
    pipeline, dispatch = waiting(), RecordingDispatch()
    job_id = start(runtime, pipeline)
    reach_wait(runtime, dispatch, pipeline, job_id)
    with runtime.engine.begin() as conn:
        conn.execute(sa.delete(timers).where(timers.c.job_id == uuid.UUID(job_id)))
    signal(runtime, dispatch, word_of(runtime, job_id), "late", None)  # no pending wait: kept
    dispatch.sent.clear()

    outcome = run_step(runtime, dispatch, pipeline, pipeline.step("wait"), job_id)  # type: ignore[arg-type]

    assert outcome is Outcome.SUCCEEDED
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "second")
    assert job.results["wait"]["signal_id"] == "late"  # type: ignore[index,call-overload]
    [row] = signal_rows(runtime.engine)
    assert (str(row.job_id), row.dispatched_at is not None) == (job_id, True)  # sent: no resend
