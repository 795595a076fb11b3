"""A worker killed in the middle of a batch: what it acted on is recorded, so only the job it
was acting on may be left in doubt — not every job of the batch (issue 13, class 6)."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

import pytest

from jobs.engine.run import run_step, run_steps
from jobs.engine.runtime import Runtime
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from ledger import JSON, DeadLetterStore, JobState, StepLedger, StepState
from tests.factories import RecordingDispatch
from tests.waiting import wait_for

_names = itertools.count()


class Killed(BaseException):
    """The worker's SIGKILL, in-process: nothing after it runs, nothing is recorded."""


@dataclass
class Notifier:
    """A provider that ignores keys: every call is one notification, for the test to count."""

    sent: list[str] = field(default_factory=list)
    #: Die while notifying for the n-th call (counted from 1).
    die_at: int | None = None


def notifying_pipeline(notifier: Notifier, *, first_notifies: bool) -> Pipeline[Notifier]:
    def look(ctx: StepContext[Notifier]) -> JSON:
        return {"word": ctx.context["word"]}

    def notify(ctx: StepContext[Notifier]) -> JSON:
        ctx.resources.sent.append(ctx.key)
        if len(ctx.resources.sent) == ctx.resources.die_at:
            raise Killed
        return {"sent": ctx.key}

    notify_step = Step(
        "notify", notify, key="n:{word}:notify", delivery=Delivery.AT_MOST_ONCE, effect="email"
    )
    look_step = Step("look", look, key="n:{word}:look")
    steps = [notify_step] if first_notifies else [look_step, notify_step]
    return Pipeline(
        name=f"kills-{next(_names)}",
        steps=steps,
        resources=lambda _settings: notifier,
    )


@pytest.mark.parametrize("first_notifies", [True, False], ids=["first step", "fast path"])
def test_a_kill_mid_batch_leaves_only_the_acting_job_unknown(
    fast: Runtime, first_notifies: bool
) -> None:
    # Given five jobs in one batch of an at-most-once step, whose worker dies during the
    # third notification (on the fast path the step follows one each job has recorded),
    fast.ledger = StepLedger(engine=fast.engine, lease_seconds=0.5)
    notifier = Notifier(die_at=3)
    pipeline = notifying_pipeline(notifier, first_notifies=first_notifies)
    tag = uuid.uuid4().hex[:6]
    created = fast.store.create_jobs(
        [pipeline.new_job(f"evt-{tag}-{n}", {"word": f"{tag}{n}"}) for n in range(5)]
    )
    job_ids = [str(job_id) for job_id, _ in created]
    dispatch = RecordingDispatch()

    with pytest.raises(Killed):
        run_steps(fast, dispatch, pipeline, pipeline.steps[0], job_ids)  # type: ignore[arg-type]

    # When every job's message comes again (redelivered, after the leases ran out),
    for job_id in job_ids:
        state = fast.store.get_job(uuid.UUID(job_id)).state
        if state is not JobState.SUCCEEDED:
            step = pipeline.step(fast.store.get_job(uuid.UUID(job_id)).current_step or "")
            _wait_for_leases(fast, job_id)
            run_step(fast, dispatch, pipeline, step, job_id, repeat=True)  # type: ignore[arg-type]

    # Then the two notified before the kill were recorded, the one notifying when it came
    # is unknown (a person decides), and the two after it were notified once each.
    states = [fast.store.get_job(uuid.UUID(job_id)).state for job_id in job_ids]
    assert states == [JobState.SUCCEEDED] * 2 + [JobState.DEAD_LETTERED] + [JobState.SUCCEEDED] * 2
    assert len(notifier.sent) == len(set(notifier.sent)) == 5
    [letter] = DeadLetterStore(engine=fast.engine).list()
    assert letter.job_id == uuid.UUID(job_ids[2])
    entries = fast.store.history(uuid.UUID(job_ids[2])).entries
    assert [e.state for e in entries if e.step == "notify"] == [StepState.UNKNOWN]


def _wait_for_leases(runtime: Runtime, job_id: str) -> None:
    """Until the job's started keys' leases ran out (0.5 s), as a redelivery after a kill
    would find them."""

    def ran_out() -> bool:
        entries = runtime.store.history(uuid.UUID(job_id)).entries
        held = [e for e in entries if e.state is StepState.STARTED]
        return all(
            e.locked_until is not None and e.locked_until.timestamp() < time.time() for e in held
        )

    wait_for(ran_out, "the leases to run out", timeout=5, interval=0.05)
