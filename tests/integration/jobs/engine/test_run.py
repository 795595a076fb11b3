"""The step runner on the real ledger (Postgres and SQLite), driven without Celery: a recording
dispatch stands where Celery would publish."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.errors import PermanentError, TransientError
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from ledger import (
    DeadLetterReason,
    DeadLetterStore,
    EventKind,
    JobState,
    Reopened,
    StepState,
)
from tests.factories import RecordingDispatch, RetryRequested, new_job

_names = itertools.count()


@dataclass
class Behaviour:
    """What the toy steps do, changed by each test."""

    failures: list[Exception] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)


def build_pipeline(
    behaviour: Behaviour, delivery: Delivery = Delivery.EXACTLY_ONCE
) -> Pipeline[Behaviour]:
    def first(ctx: StepContext[Behaviour]) -> dict[str, object]:
        ctx.resources.calls.append(f"first#{ctx.attempt}")
        if ctx.resources.failures:
            raise ctx.resources.failures.pop(0)
        return {"word": ctx.context["word"], "key": ctx.key}

    def second(ctx: StepContext[Behaviour]) -> dict[str, object]:
        ctx.resources.calls.append("second")
        return {"seen": ctx.results["first"]}

    return Pipeline(
        name=f"runner-{next(_names)}",
        steps=[
            Step("first", first, key="w:{word}:first", delivery=delivery),  # type: ignore[arg-type]
            Step("second", second, key="w:{word}:second"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: behaviour,
    )


def start(runtime: Runtime, pipeline: Pipeline[Behaviour], word: str) -> str:
    [(job_id, _)] = runtime.store.create_jobs(
        [pipeline.new_job(f"evt-{uuid.uuid4().hex}", {"word": word})]
    )
    return str(job_id)


def run(
    runtime: Runtime,
    dispatch: RecordingDispatch,
    pipeline: Pipeline[Behaviour],
    step: str,
    job_id: str,
) -> Outcome:
    return run_step(runtime, dispatch, pipeline, pipeline.step(step), job_id)  # type: ignore[arg-type]


def test_a_step_records_its_result_and_hands_the_job_on(runtime: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"hello-{uuid.uuid4().hex[:6]}")

    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.SUCCEEDED
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    assert run(runtime, dispatch, pipeline, "second", job_id) is Outcome.SUCCEEDED

    job = runtime.store.get_job(uuid.UUID(job_id))
    assert job.state is JobState.SUCCEEDED
    assert job.results["second"] == {"seen": job.results["first"]}
    assert behaviour.calls == ["first#1", "second"]


def test_a_redelivered_step_does_not_act_again_but_hands_the_job_on_again(runtime: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"dup-{uuid.uuid4().hex[:6]}")
    run(runtime, dispatch, pipeline, "first", job_id)

    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.DUPLICATE

    assert behaviour.calls == ["first#1"]
    assert dispatch.sent == [(pipeline.name, "second", job_id)] * 2


def test_a_transient_failure_is_recorded_and_retried_later(runtime: Runtime) -> None:
    behaviour = Behaviour(failures=[TransientError("503", retry_after=0.7)])
    dispatch, pipeline = RecordingDispatch(), build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"flaky-{uuid.uuid4().hex[:6]}")

    with pytest.raises(RetryRequested) as retry:
        run(runtime, dispatch, pipeline, "first", job_id)
    assert 0.7 <= retry.value.delay <= 1.0
    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.SUCCEEDED

    history = runtime.store.history(uuid.UUID(job_id))
    assert [e.kind for e in history.events] == [EventKind.FAILED, EventKind.SUCCEEDED]
    assert behaviour.calls == ["first#1", "first#2"]


def test_a_permanent_failure_dead_letters_at_once(runtime: Runtime) -> None:
    behaviour = Behaviour(failures=[PermanentError("402 card_declined")])
    dispatch, pipeline = RecordingDispatch(), build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"declined-{uuid.uuid4().hex[:6]}")

    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.DEAD_LETTERED

    history = runtime.store.history(uuid.UUID(job_id))
    assert history.job.state is JobState.DEAD_LETTERED
    detail = history.events[-1].detail
    assert isinstance(detail, dict)
    error = detail["error"]
    assert isinstance(error, dict)
    assert error["type"] == "PermanentError"
    assert "Traceback" in str(error["traceback"])
    assert dispatch.sent == []


def test_exhausted_attempts_dead_letter(runtime: Runtime) -> None:
    behaviour = Behaviour(failures=[TransientError("503")] * 3)
    dispatch, pipeline = RecordingDispatch(), build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"tired-{uuid.uuid4().hex[:6]}")

    for _ in range(2):
        with pytest.raises(RetryRequested):
            run(runtime, dispatch, pipeline, "first", job_id)
    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.DEAD_LETTERED
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.DEAD_LETTERED


def test_an_at_most_once_step_that_may_have_acted_is_unknown(runtime: Runtime) -> None:
    behaviour = Behaviour(failures=[TransientError("timed out", maybe_applied=True)])
    dispatch = RecordingDispatch()
    pipeline = build_pipeline(behaviour, Delivery.AT_MOST_ONCE)
    job_id = start(runtime, pipeline, f"ambiguous-{uuid.uuid4().hex[:6]}")

    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.DEAD_LETTERED

    history = runtime.store.history(uuid.UUID(job_id))
    assert history.entries[0].state is StepState.UNKNOWN
    assert history.job.state is JobState.DEAD_LETTERED


def test_the_same_request_under_another_event_adopts_the_result(runtime: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    word = f"twice-{uuid.uuid4().hex[:6]}"
    first_job, second_job = start(runtime, pipeline, word), start(runtime, pipeline, word)
    run(runtime, dispatch, pipeline, "first", first_job)

    assert run(runtime, dispatch, pipeline, "first", second_job) is Outcome.DUPLICATE

    assert behaviour.calls == ["first#1"]
    assert dispatch.sent[-1] == (pipeline.name, "second", second_job)
    adopted = runtime.store.get_job(uuid.UUID(second_job))
    assert adopted.results == runtime.store.get_job(uuid.UUID(first_job)).results


def test_a_replayed_step_that_had_succeeded_moves_the_job_on(runtime: Runtime) -> None:
    """The job was dead-lettered at a step whose key had in fact succeeded (a late owner
    recorded after it was declared lost): running it again adopts the result, acts on nothing."""
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(runtime, pipeline, f"caught-{uuid.uuid4().hex[:6]}")
    run(runtime, dispatch, pipeline, "first", job_id)
    runtime.ledger.dead_letter(
        uuid.UUID(job_id), "first", {"type": "X"}, reason=DeadLetterReason.PERMANENT
    )
    [letter] = DeadLetterStore(engine=runtime.engine).list()
    assert isinstance(
        DeadLetterStore(engine=runtime.engine).replay(letter.id, by="t", allow_unknown=False),
        Reopened,
    )
    dispatch.sent.clear()

    assert run(runtime, dispatch, pipeline, "first", job_id) is Outcome.DUPLICATE

    assert behaviour.calls == ["first#1"]
    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    assert runtime.store.get_job(uuid.UUID(job_id)).current_step == "second"


def test_a_step_missing_from_the_jobs_plan_dead_letters_it(runtime: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    [(job_id, _)] = runtime.store.create_jobs([new_job(steps=("first",))])

    assert run(runtime, dispatch, pipeline, "second", str(job_id)) is Outcome.DEAD_LETTERED

    [letter] = DeadLetterStore(engine=runtime.engine).list()
    assert (letter.error_type, letter.reason) == ("StepNotInJob", DeadLetterReason.PERMANENT)


def test_the_fast_path_runs_the_following_steps_without_messages(fast: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(fast, pipeline, f"fast-{uuid.uuid4().hex[:6]}")

    assert run(fast, dispatch, pipeline, "first", job_id) is Outcome.SUCCEEDED

    assert dispatch.sent == []
    history = fast.store.history(uuid.UUID(job_id))
    assert history.job.state is JobState.SUCCEEDED
    assert [(e.step, e.kind) for e in history.events] == [
        ("first", EventKind.SUCCEEDED),
        ("second", EventKind.SUCCEEDED),
    ]
    assert behaviour.calls == ["first#1", "second"]


def test_a_failure_on_the_fast_path_goes_back_to_the_broker(fast: Runtime) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(fast, pipeline, f"fastfail-{uuid.uuid4().hex[:6]}")

    def failing_second(ctx: StepContext[Behaviour]) -> dict[str, object]:
        raise TransientError("503")

    broken = Pipeline(
        name=f"runner-{next(_names)}",
        steps=[pipeline.steps[0], Step("second", failing_second, key="w:{word}:second")],  # type: ignore[arg-type]
        resources=lambda _settings: behaviour,
    )
    [(job, _)] = fast.store.create_jobs(
        [broken.new_job(f"evt-{uuid.uuid4().hex}", {"word": f"x{job_id[:6]}"})]
    )

    assert run(fast, dispatch, broken, "first", str(job)) is Outcome.RETRYING

    [(name, step, sent_job)] = dispatch.sent
    assert (name, step, sent_job) == (broken.name, "second", str(job))
    assert fast.store.get_job(job).current_step == "second"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_fast_path_costs_one_statement_per_step_after_the_first(
    fast: Runtime, statements: list[str]
) -> None:
    behaviour, dispatch = Behaviour(), RecordingDispatch()
    pipeline = build_pipeline(behaviour)
    job_id = start(fast, pipeline, f"count-{uuid.uuid4().hex[:6]}")
    statements.clear()

    run(fast, dispatch, pipeline, "first", job_id)

    # claim first · record first + claim second · record second
    assert len(statements) == 3, statements
