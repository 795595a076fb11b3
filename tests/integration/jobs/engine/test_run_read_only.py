"""A read-only first step on Postgres: a run reads its jobs instead of claiming, acts,
and records with the next step's claim; failures and repeats still go through claims."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest

from jobs.engine.run import Outcome, run_step, run_steps
from jobs.engine.runtime import Runtime
from jobs.errors import TransientError
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from ledger import EventKind, JobState, Reading, StepState, first_reading
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


def brought(runtime: Runtime, job_id: str, step: str = "look") -> Reading:
    """What the job's first message brings (see `jobs.engine.enqueue`)."""
    job = runtime.store.get_job(uuid.UUID(job_id))
    return first_reading(job.id, step, job.step_keys[step], job.context)


def test_a_reading_its_message_brought_spares_the_read(
    fast: Runtime, statements: list[str]
) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    job_ids = start(fast, pipeline, 3)
    readings = [brought(fast, job_id) for job_id in job_ids]
    statements.clear()

    step = pipeline.step("look")
    one = run_step(fast, dispatch, pipeline, step, job_ids[0], reading=readings[0])  # type: ignore[arg-type]
    # A batch: the last job's message brought nothing, so it alone is read.
    rest = run_steps(fast, dispatch, pipeline, step, job_ids[1:], readings=[readings[1], None])  # type: ignore[arg-type]

    assert [one, *rest] == [Outcome.SUCCEEDED] * 3
    # One job alone: record look + claim use · record use. The batch: a read of one job,
    # then a transaction per stage.
    assert [s.split()[0] for s in statements[:2]] == ["WITH", "WITH"]
    assert next(s for s in statements[2:] if s not in ("BEGIN", "COMMIT")).startswith("SELECT")
    assert sum(s.startswith("SELECT") for s in statements) == 1
    assert dispatch.sent == []
    for job_id in job_ids:
        assert fast.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


@pytest.mark.parametrize("since", ["claimed by another run", "recorded by another run"])
def test_a_reading_that_no_longer_holds_is_claimed_instead(fast: Runtime, since: str) -> None:
    """The step's key changed between the job's enqueue and this delivery: nothing is
    recorded on the strength of the message, and the job goes on the retry queue, to be
    claimed (and wait, or find the step done)."""
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(fast, pipeline)
    reading, step = brought(fast, job_id), pipeline.step("look")
    if since == "claimed by another run":
        fast.ledger.claim_step(uuid.UUID(job_id), "look")
    else:
        assert run_step(fast, dispatch, pipeline, step, job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    before = fast.store.history(uuid.UUID(job_id))

    outcome = run_step(fast, dispatch, pipeline, step, job_id, reading=reading)  # type: ignore[arg-type]

    assert outcome is Outcome.RETRYING
    assert dispatch.resent == [job_id]
    assert dispatch.sent[-1] == (pipeline.name, "look", job_id)
    assert fast.store.history(uuid.UUID(job_id)) == before


def test_a_message_that_may_repeat_an_attempt_claims_despite_its_reading(
    fast: Runtime, statements: list[str]
) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(fast, pipeline)
    reading = brought(fast, job_id)
    statements.clear()

    step = pipeline.step("look")
    outcome = run_step(fast, dispatch, pipeline, step, job_id, repeat=True, reading=reading)  # type: ignore[arg-type]

    assert outcome is Outcome.SUCCEEDED
    assert statements[0].startswith("WITH")  # the claim
    [look] = [e for e in fast.store.history(uuid.UUID(job_id)).entries if e.step == "look"]
    assert look.attempts == 1


def test_a_reading_for_another_job_is_not_used(fast: Runtime, statements: list[str]) -> None:
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    first, second = start(fast, pipeline, 2)
    statements.clear()

    step = pipeline.step("look")
    outcome = run_step(fast, dispatch, pipeline, step, second, reading=brought(fast, first))  # type: ignore[arg-type]

    assert outcome is Outcome.SUCCEEDED
    assert statements[0].startswith("SELECT")  # read as if nothing had been brought
    assert looks.calls == [1]
    assert fast.store.get_job(uuid.UUID(first)).state is JobState.PENDING


def test_a_forged_reading_never_becomes_the_jobs_result(fast: Runtime) -> None:
    """Given a message whose reading says another word than the job's row (stale, or forged
    by whoever can publish to the broker), when it is delivered, then nothing it computed is
    recorded: the job goes to be claimed, and the claim runs the step on the row."""
    looks, dispatch = Looks(), RecordingDispatch()
    pipeline = lookup_pipeline(looks)
    [job_id] = start(fast, pipeline)
    row = brought(fast, job_id)
    forged = first_reading(row.job_id, row.step, row.key, {"word": "forged"})
    step = pipeline.step("look")

    assert run_step(fast, dispatch, pipeline, step, job_id, reading=forged) is Outcome.RETRYING  # type: ignore[arg-type]
    assert dispatch.resent == [job_id]
    assert run_step(fast, dispatch, pipeline, step, job_id, repeat=True) is Outcome.SUCCEEDED  # type: ignore[arg-type]

    job = fast.store.get_job(uuid.UUID(job_id))
    assert job.state is JobState.SUCCEEDED
    assert job.results["look"] == {"seen": job.context["word"]}
