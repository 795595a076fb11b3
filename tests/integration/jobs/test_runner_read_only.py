"""A read-only first step on Postgres: a delivery reads its jobs instead of claiming, acts,
and records with the next step's claim; failures and repeats still go through claims."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest

from jobs.errors import TransientError
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.runner import Outcome, run_step, run_steps
from jobs.runtime import Runtime
from ledger import EventKind, JobState, StepState
from tests.factories import RecordingDispatch, RetryRequested

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

_names = itertools.count()


@dataclass
class Looks:
    """What the read-only step does: how often it ran, and the errors it raises first."""

    calls: list[int] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)


def lookup_pipeline(looks: Looks) -> Pipeline[Looks]:
    def look(ctx: StepContext[Looks]) -> dict[str, object]:
        ctx.resources.calls.append(ctx.attempt)
        if ctx.resources.failures:
            raise ctx.resources.failures.pop(0)
        return {"seen": ctx.context["word"]}

    def use(ctx: StepContext[Looks]) -> dict[str, object]:
        return {"used": ctx.results["look"]}

    return Pipeline(
        name=f"lookup-{next(_names)}",
        steps=[
            Step("look", look, key="l:{word}:look", delivery=Delivery.READ_ONLY),  # type: ignore[arg-type]
            Step("use", use, key="l:{word}:use"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: looks,
    )


def start(runtime: Runtime, pipeline: Pipeline[Looks], count: int = 1) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    created = runtime.store.create_jobs(
        [pipeline.new_job(f"evt-{uuid.uuid4().hex}", {"word": f"{tag}{n}"}) for n in range(count)]
    )
    return [str(job_id) for job_id, _ in created]


def test_a_read_only_step_costs_a_read_not_a_claim(fast: Runtime, statements: list[str]) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(fast, pipeline)
    statements.clear()

    outcome = run_step(fast, dispatch, pipeline, pipeline.step("look"), job_id)  # type: ignore[arg-type]

    assert outcome is Outcome.SUCCEEDED
    # read · record look + claim use · record use
    assert [s.split()[0] for s in statements] == ["SELECT", "WITH", "WITH"]
    history = fast.store.history(uuid.UUID(job_id))
    assert history.job.state is JobState.SUCCEEDED
    assert [(e.step, e.state, e.attempts) for e in history.entries] == [
        ("look", StepState.SUCCEEDED, 1),
        ("use", StepState.SUCCEEDED, 1),
    ]


def test_a_batch_reads_all_its_jobs_in_one_statement(fast: Runtime, statements: list[str]) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    job_ids = start(fast, pipeline, 5)
    statements.clear()

    outcomes = run_steps(fast, dispatch, pipeline, pipeline.step("look"), job_ids)  # type: ignore[arg-type]

    assert outcomes == [Outcome.SUCCEEDED] * 5
    assert statements[0].startswith("SELECT")
    assert statements.count(statements[0]) == 1
    assert statements.count("COMMIT") == 2


def test_a_failed_read_only_attempt_is_claimed_counted_and_retried(runtime: Runtime) -> None:
    looks = Looks(failures=[TransientError("503")])
    dispatch, pipeline = RecordingDispatch(), lookup_pipeline(looks)
    [job_id] = start(runtime, pipeline)

    with pytest.raises(RetryRequested):
        run_step(runtime, dispatch, pipeline, pipeline.step("look"), job_id)  # type: ignore[arg-type]
    assert run_step(runtime, dispatch, pipeline, pipeline.step("look"), job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]

    assert looks.calls == [1, 2]
    history = runtime.store.history(uuid.UUID(job_id))
    [look] = [e for e in history.entries if e.step == "look"]
    assert (look.state, look.attempts) == (StepState.SUCCEEDED, 2)
    assert [e.kind for e in history.events] == [EventKind.FAILED, EventKind.SUCCEEDED]


def test_a_redelivered_message_claims_its_read_only_step(
    runtime: Runtime, statements: list[str]
) -> None:
    """Its worker may have died running the step: the claim counts the attempt, so a step
    that kills its worker every time still runs out of attempts."""
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(runtime, pipeline)
    statements.clear()

    step = pipeline.step("look")
    outcome = run_step(runtime, dispatch, pipeline, step, job_id, repeat=True)  # type: ignore[arg-type]

    assert outcome is Outcome.SUCCEEDED
    assert statements[0].startswith("WITH")  # the claim


def test_two_deliveries_of_a_read_only_step_record_it_once(fast: Runtime) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(fast, pipeline)

    outcomes = run_steps(fast, dispatch, pipeline, pipeline.step("look"), [job_id, job_id])  # type: ignore[arg-type]

    # Both read the job and ran the step (harmless: it reads); the second record found the
    # job moved on and wrote nothing.
    assert outcomes == [Outcome.SUCCEEDED, Outcome.DUPLICATE]
    assert len(looks.calls) == 2
    history = fast.store.history(uuid.UUID(job_id))
    assert [(e.step, e.kind) for e in history.events] == [
        ("look", EventKind.SUCCEEDED),
        ("use", EventKind.SUCCEEDED),
    ]
