"""Several jobs at the same step in one run (`run_steps`, what a worker's batch runs), on
the real ledger: each job ends as it would alone, the statements are shared per stage."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobs.engine.run import Outcome, StepTimer, run_steps
from jobs.engine.runtime import Runtime
from jobs.errors import PermanentError, TransientError
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.worker.time_limits import step_timer
from ledger import DeadLetterStore, JobState, StepLedger
from ledger.db import as_utc
from tests.conftest import settings_for
from tests.factories import RecordingDispatch

_names = itertools.count()


@dataclass
class Script:
    """What the toy steps do: per word, the errors its first step raises first."""

    failures: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    #: Seconds each step takes.
    pause: float = 0.0
    #: Called by each step as it starts.
    look: Callable[[StepContext[Script]], None] | None = None


def toy_pipeline(script: Script, *, time_limit: float | None = None) -> Pipeline[Script]:
    def first(ctx: StepContext[Script]) -> dict[str, object]:
        word = str(ctx.context["word"])
        ctx.resources.calls.append(f"first:{word}")
        if ctx.resources.look:
            ctx.resources.look(ctx)
        time.sleep(ctx.resources.pause)
        pending = ctx.resources.failures.get(word)
        if pending:
            raise pending.pop(0)
        return {"word": word}

    def second(ctx: StepContext[Script]) -> dict[str, object]:
        ctx.resources.calls.append(f"second:{ctx.context['word']}")
        if ctx.resources.look:
            ctx.resources.look(ctx)
        time.sleep(ctx.resources.pause)
        return {"seen": ctx.results["first"]}

    return Pipeline(
        name=f"batch-{next(_names)}",
        steps=[
            Step("first", first, key="b:{word}:first", time_limit=time_limit),  # type: ignore[arg-type]
            Step("second", second, key="b:{word}:second"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: script,
    )


def start(runtime: Runtime, pipeline: Pipeline[Script], words: list[str]) -> list[str]:
    created = runtime.store.create_jobs(
        [pipeline.new_job(f"evt-{uuid.uuid4().hex}", {"word": word}) for word in words]
    )
    return [str(job_id) for job_id, _ in created]


def words(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"w{n}-{tag}" for n in range(count)]


def run(
    runtime: Runtime,
    dispatch: RecordingDispatch,
    pipeline: Pipeline[Script],
    job_ids: list[str],
    timer: StepTimer | None = None,
) -> list[Outcome]:
    step = pipeline.step("first")
    return run_steps(runtime, dispatch, pipeline, step, job_ids, timer=timer)  # type: ignore[arg-type]


def test_a_batch_on_the_fast_path_runs_every_job_to_the_end(fast: Runtime) -> None:
    script, dispatch = Script(), RecordingDispatch()
    pipeline = toy_pipeline(script)
    job_ids = start(fast, pipeline, words(4))

    assert run(fast, dispatch, pipeline, job_ids) == [Outcome.SUCCEEDED] * 4

    assert dispatch.sent == []
    for job_id in job_ids:
        job = fast.store.get_job(uuid.UUID(job_id))
        assert job.state is JobState.SUCCEEDED
        assert job.results["second"] == {"seen": job.results["first"]}
    assert len(script.calls) == 8


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_batch_shares_one_transaction_per_stage(fast: Runtime, statements: list[str]) -> None:
    script, dispatch = Script(), RecordingDispatch()
    pipeline = toy_pipeline(script)
    job_ids = start(fast, pipeline, words(4))
    statements.clear()

    run(fast, dispatch, pipeline, job_ids)

    # claim first · record first + claim second · record second: three transactions of four
    transactions = [s for s in statements if s == "COMMIT"]
    assert len(transactions) == 3
    assert len(statements) == 3 * (4 + 2), statements


def test_in_a_chained_batch_each_job_is_handed_on_by_message(runtime: Runtime) -> None:
    script, dispatch = Script(), RecordingDispatch()
    pipeline = toy_pipeline(script)
    job_ids = start(runtime, pipeline, words(3))

    assert run(runtime, dispatch, pipeline, job_ids) == [Outcome.SUCCEEDED] * 3

    assert dispatch.sent == [(pipeline.name, "second", job_id) for job_id in job_ids]


def test_a_failure_in_a_batch_is_retried_alone_and_the_rest_go_on(fast: Runtime) -> None:
    # Given a batch where one job's first step fails transiently and another's for good
    names = words(4)
    script = Script(failures={names[1]: [TransientError("503")], names[2]: [PermanentError("402")]})
    dispatch, pipeline = RecordingDispatch(), toy_pipeline(script)
    job_ids = start(fast, pipeline, names)

    outcomes = run(fast, dispatch, pipeline, job_ids)

    # Then the flaky job goes back to the broker as a message of its own, the declined one
    # is dead-lettered, and the others finish
    assert outcomes == [
        Outcome.SUCCEEDED,
        Outcome.RETRYING,
        Outcome.DEAD_LETTERED,
        Outcome.SUCCEEDED,
    ]
    assert dispatch.sent == [(pipeline.name, "first", job_ids[1])]
    states = [fast.store.get_job(uuid.UUID(j)).state for j in job_ids]
    assert states == [
        JobState.SUCCEEDED,
        JobState.RUNNING,
        JobState.DEAD_LETTERED,
        JobState.SUCCEEDED,
    ]
    [letter] = DeadLetterStore(engine=fast.engine).list()
    assert letter.job_id == uuid.UUID(job_ids[2])


def test_the_same_job_twice_in_a_batch_acts_once(fast: Runtime) -> None:
    script, dispatch = Script(), RecordingDispatch()
    pipeline = toy_pipeline(script)
    [job_id] = start(fast, pipeline, words(1))

    outcomes = run(fast, dispatch, pipeline, [job_id, job_id])

    # The second copy found the key held by the first and went back to the broker.
    assert outcomes == [Outcome.SUCCEEDED, Outcome.RETRYING]
    assert len([call for call in script.calls if call.startswith("first")]) == 1
    assert dispatch.sent == [(pipeline.name, "first", job_id)]


def test_a_slow_batch_renews_the_leases_of_the_jobs_still_waiting(
    database_url: str, tmp_path: Path, runtime: Runtime
) -> None:
    # Given leases of 2 s, a time limit of 1 s, and steps of 0.35 s: the last of five jobs
    # would act 1.4 s after its claim, with less lease left than its time limit
    runtime.settings = settings_for(
        database_url=database_url,
        broker_url=None,
        data_dir=tmp_path,
        fast_path=True,
        step_lease=2.0,
        step_time_limit=1.0,
    )
    runtime.ledger = StepLedger(engine=runtime.engine, lease_seconds=2.0)
    lease_left: list[float] = []

    def look(ctx: StepContext[Script]) -> None:
        [entry] = [
            e for e in runtime.store.history(uuid.UUID(ctx.job_id)).entries if e.key == ctx.key
        ]
        assert entry.locked_until is not None
        lease_left.append((as_utc(entry.locked_until) - datetime.now(UTC)).total_seconds())

    script, dispatch = Script(pause=0.35, look=look), RecordingDispatch()
    pipeline = toy_pipeline(script)
    job_ids = start(runtime, pipeline, words(5))

    outcomes = run(runtime, dispatch, pipeline, job_ids)

    # Then every job acted with at least its time limit of lease left, and finished
    assert outcomes == [Outcome.SUCCEEDED] * 5
    assert len(lease_left) == 10
    assert min(lease_left) >= 0.9, lease_left
    for job_id in job_ids:
        history = runtime.store.history(uuid.UUID(job_id))
        assert [entry.attempts for entry in history.entries] == [1, 1]


def test_a_step_past_its_time_limit_in_a_batch_is_interrupted_and_retried(
    runtime: Runtime,
) -> None:
    # Given a first step limited to 0.2 s that would take 30 s for one job of two
    script, dispatch = Script(pause=30.0), RecordingDispatch()
    pipeline = toy_pipeline(script, time_limit=0.2)
    job_ids = start(runtime, pipeline, words(2))

    began = time.monotonic()
    outcomes = run(runtime, dispatch, pipeline, job_ids[:1], timer=step_timer)

    # Then the step is cut short at its limit and retried, as Celery's soft limit would be
    assert time.monotonic() - began < 10
    assert outcomes == [Outcome.RETRYING]
    [error] = [e.detail for e in runtime.store.history(uuid.UUID(job_ids[0])).events]
    assert isinstance(error, dict)
    assert error["error"]["type"] == "SoftTimeLimitExceeded"  # type: ignore[index,call-overload]
    # And a step within its limit is not disturbed
    script.pause = 0.0
    assert run(runtime, dispatch, pipeline, job_ids[1:], timer=step_timer) == [Outcome.SUCCEEDED]
