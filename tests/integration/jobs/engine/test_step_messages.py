"""Step messages that cannot be run, through the real task body and a pool child's
batch, on the real ledger: rejected (or, naming no job, acknowledged) and counted once, while
the good jobs beside them run."""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path

import pytest
from celery.exceptions import Reject

from jobs.engine.run import Outcome
from jobs.engine.runtime import Runtime
from jobs.pipelines import registry
from jobs.worker.batching import MALFORMED, run_batch
from ledger import JobState, MalformedMessages
from tests.toy_pipeline import toy_slow

NAP = "oncelery.toy-slow.nap"
#: The module (`jobs.worker.app` the name is the Celery app `jobs` exports).
app_module = importlib.import_module("jobs.worker.app")


@pytest.fixture
def process_runtime(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Runtime:
    """The test's runtime as this process's (what `jobs.worker.app.runtime()` answers)."""
    # Celery's app reads its configuration on first use: keep what it creates in tmp_path.
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(app_module, "_runtime", runtime)
    assert registry.get(toy_slow.name) is toy_slow
    return runtime


def _counts(rt: Runtime) -> dict[tuple[str, str], int]:
    return {(c.task, c.reason): c.count for c in MalformedMessages(engine=rt.engine).counts()}


def test_a_task_message_that_cannot_be_a_delivery_is_rejected_and_counted(
    process_runtime: Runtime,
) -> None:
    task = app_module.app.tasks[NAP]

    # When the task body gets keyword arguments, a job id that is not a UUID, a UUID of no job
    keywords = task.apply(kwargs={"job_id": str(uuid.uuid4())})
    not_uuid = task.apply(args=["not-a-uuid"])
    no_job = task.apply(args=[str(uuid.uuid4())])

    # Then the first two are rejected without requeueing, the last acknowledged; all counted
    for result in (keywords, not_uuid):
        assert result.state == "REJECTED"
        assert isinstance(result.result, Reject)
        assert result.result.requeue is False  # type: ignore[attr-defined]
    assert (no_job.state, no_job.result) == ("SUCCESS", Outcome.INACTIVE)
    assert _counts(process_runtime) == {
        (NAP, "arguments"): 1,
        (NAP, "job_id"): 1,
        (NAP, "no_such_job"): 1,
    }


def test_a_batch_rejects_what_cannot_be_a_delivery_and_runs_its_neighbours(
    process_runtime: Runtime,
) -> None:
    # Given a good job, between messages that cannot be run, in one batch
    [(good, created)] = process_runtime.store.create_jobs(
        [toy_slow.new_job(f"nap-{uuid.uuid4().hex[:8]}", {"name": "n", "seconds": 0})]
    )
    assert created
    messages: list[tuple[str, object, object]] = [
        ("m-keywords", [], {"job_id": str(good)}),
        ("m-good", [str(good)], {}),
        ("m-not-uuid", ["not-a-uuid"], {}),
        ("m-no-job", [str(uuid.uuid4())], {}),
    ]

    # When a pool child runs the batch
    answers = run_batch(NAP, messages, [False] * 4, [None] * 4)

    # Then each ends on its own: the good job is done, the bad ones are not run, and counted
    assert [outcome for outcome, _ in answers] == [
        MALFORMED,
        Outcome.SUCCEEDED,
        MALFORMED,
        Outcome.INACTIVE,
    ]
    assert process_runtime.store.get_job(good).state is JobState.SUCCEEDED
    assert _counts(process_runtime) == {
        (NAP, "arguments"): 1,
        (NAP, "job_id"): 1,
        (NAP, "no_such_job"): 1,
    }
