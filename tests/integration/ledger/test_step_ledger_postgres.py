"""`PostgresStepLedger`: a step costs one statement to claim and one to record, a batch one
transaction per stage."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ledger import (
    Claim,
    JobStore,
    StepLedger,
    StepResult,
)
from tests.factories import create_job


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


@pytest.fixture
def ledger(engine: sa.Engine) -> StepLedger:
    return StepLedger(engine=engine, lease_seconds=30)


def claimed(outcome: object) -> Claim:
    assert isinstance(outcome, Claim), outcome
    return outcome


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_happy_path_costs_two_statements_per_step_on_postgres(
    store: JobStore, ledger: StepLedger, statements: list[str]
) -> None:
    job_id = create_job(store)
    statements.clear()

    first = claimed(ledger.claim_step(job_id, "first"))
    ledger.record_success(first, {"n": 1}, next_step="second", duration_ms=1.0)

    assert len(statements) == 2, statements


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_batch_costs_one_transaction_per_stage_on_postgres(
    store: JobStore, ledger: StepLedger, statements: list[str]
) -> None:
    jobs = [create_job(store) for _ in range(5)]
    statements.clear()

    claims = [claimed(found) for found in ledger.claim_steps(jobs, "first")]
    ledger.record_successes([StepResult(c, {}, 1.0) for c in claims], next_step="second")

    # One claim and one record per job, in two transactions (each sent as one pipeline).
    sent = [statement.split()[0] for statement in statements]
    assert sent == ["BEGIN", *["WITH"] * 5, "COMMIT", "BEGIN", *["WITH"] * 5, "COMMIT"]
