"""Leases kept while a step acts (`jobs.engine.leases`): a step that runs longer than its
lease keeps its key, so no other run takes it over meanwhile; a key nobody renews comes
free within one lease."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.pipelines import Pipeline, Step, StepContext
from ledger import JSON, Claim, InFlight, JobStore, LeaseLost, StepLedger, StepState
from tests.conftest import settings_for
from tests.factories import RecordingDispatch
from tests.waiting import wait_for

#: The shortest lease the settings allow; renewed every third of it.
LEASE = 1.0


@pytest.fixture
def leased(database_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, step_lease=LEASE
    )
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


def test_a_step_that_outlasts_its_lease_keeps_its_key(leased: Runtime) -> None:
    # Given a step that takes three leases, and another run of the same job meanwhile
    seen: list[object] = []

    def slow(ctx: StepContext[None]) -> JSON:
        time.sleep(3 * LEASE)
        return {"done": ctx.key}

    pipeline: Pipeline[None] = Pipeline(
        name=f"leases-{uuid.uuid4().hex[:6]}",
        steps=[Step("slow", slow, key="l:{n}:slow")],
        resources=lambda _settings: None,
    )
    [(job_id, _)] = leased.store.create_jobs([pipeline.new_job("evt-1", {"n": uuid.uuid4().hex})])

    def rival() -> None:
        # Past two leases: unrenewed, the slow step's key would be free by now.
        time.sleep(2 * LEASE)
        other = StepLedger(engine=leased.engine, lease_seconds=LEASE)
        seen.append(other.claim_step(job_id, "slow"))
        other.close()

    thread = threading.Thread(target=rival)
    thread.start()

    # When it runs
    outcome = run_step(leased, RecordingDispatch(), pipeline, pipeline.step("slow"), str(job_id))  # type: ignore[arg-type]
    thread.join()

    # Then the rival found the key in flight, long after a lease, and the step recorded once
    assert outcome is Outcome.SUCCEEDED
    [rival_found] = seen
    assert isinstance(rival_found, InFlight), rival_found
    [entry] = leased.store.history(job_id).entries
    assert (entry.state, entry.attempts) == (StepState.SUCCEEDED, 1)


def test_a_released_claim_is_no_longer_renewed(leased: Runtime, engine: sa.Engine) -> None:
    store = JobStore(engine=engine)
    pipeline: Pipeline[None] = Pipeline(
        name=f"leases-{uuid.uuid4().hex[:6]}",
        steps=[Step("s", lambda _ctx: {}, key="r:{n}:s")],
        resources=lambda _settings: None,
    )
    [(job_id, _)] = store.create_jobs([pipeline.new_job("evt-1", {"n": uuid.uuid4().hex})])
    claim = leased.ledger.claim_step(job_id, "s")
    assert isinstance(claim, Claim)

    leased.leases.hold([claim])
    # Two leases: unrenewed, the key would have come free by now.
    time.sleep(2 * LEASE)
    assert isinstance(leased.ledger.claim_step(job_id, "s"), InFlight)  # renewed: still held
    leased.leases.release([claim])

    def taken_over() -> Claim | None:
        found = leased.ledger.claim_step(job_id, "s")
        return found if isinstance(found, Claim) else None

    taken = wait_for(taken_over, "the released key to come free", timeout=3 * LEASE)
    assert taken.owner != claim.owner
    # The first owner's record is fenced out.
    with pytest.raises(LeaseLost):
        leased.ledger.record_success(claim, {}, next_step=None, duration_ms=1.0)
