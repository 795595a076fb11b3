"""Statements whose commit was applied but whose answer was lost (a connection dropped after
COMMIT): `retrying` runs them again, and the second run must find its own work, neither
stalling the job nor writing it twice (DESIGN.md hazard 6). Postgres: its autocommit
statements are the ones a lost answer can leave applied."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import (
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DatabaseUnavailable,
    EventKind,
    JobState,
    JobStore,
    LedgerError,
    PostgresStepLedger,
    Recorded,
    StepLedger,
    StepResult,
    StepState,
)
from tests.factories import create_job

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


@pytest.fixture
def ledger(engine: sa.Engine) -> Iterator[PostgresStepLedger]:
    ledger = StepLedger(engine=engine, lease_seconds=30)
    assert isinstance(ledger, PostgresStepLedger)
    yield ledger
    ledger.close()


def claimed(ledger: StepLedger, job_id: uuid.UUID, step: str = "first") -> Claim:
    claim = ledger.claim_step(job_id, step)
    assert isinstance(claim, Claim), claim
    return claim


def record_and_claim_next(ledger: StepLedger, claim: Claim) -> tuple[Recorded, ClaimOutcome | None]:
    """The fast path's record of `claim` (result `{"n": 1}`) and claim of step "second"."""
    done = [StepResult(claim, {"n": 1}, 1.0)]
    [found] = ledger.record_and_claim_next_steps(done, next_step="second")
    assert not isinstance(found, LedgerError), found
    return found


def lose_the_next_answer(monkeypatch: pytest.MonkeyPatch, ledger: PostgresStepLedger) -> list[int]:
    """The direct connection's next statement runs and commits, then its answer is lost as
    when the connection drops; returns how many statements ran."""
    direct = ledger.direct
    real: Callable[..., Any] = direct.one
    ran: list[int] = []

    def one(template: Any, values: Any) -> Any:
        answer = real(template, values)
        ran.append(1)
        if len(ran) == 1:
            raise DatabaseUnavailable("server closed the connection unexpectedly")
        return answer

    monkeypatch.setattr(direct, "one", one)
    return ran


def test_a_fast_path_record_whose_answer_was_lost_keeps_its_next_claim(
    monkeypatch: pytest.MonkeyPatch, store: JobStore, ledger: PostgresStepLedger
) -> None:
    """Given a record-and-claim that committed (the step recorded, the next step claimed for
    a fresh owner) but whose answer never came, when `retrying` runs it again, then the
    worker still gets the next step's claim — not a key held for a whole lease by an owner
    that no worker has."""
    job_id = create_job(store)
    first = claimed(ledger, job_id)
    ran = lose_the_next_answer(monkeypatch, ledger)

    recorded, following = record_and_claim_next(ledger, first)

    assert len(ran) >= 2
    assert recorded.job_state is JobState.RUNNING
    assert isinstance(following, Claim), following
    assert (following.step, following.attempt) == ("second", 1)
    entries = {entry.step: entry for entry in store.history(job_id).entries}
    assert entries["second"].state is StepState.STARTED
    # The claim is the worker's: it records under it.
    monkeypatch.undo()
    done = ledger.record_success(following, {"n": 2}, next_step=None, duration_ms=1.0)
    assert done.job_state is JobState.SUCCEEDED


def test_a_duplicate_noted_twice_after_a_lost_answer_is_written_once(
    engine: sa.Engine, store: JobStore, ledger: StepLedger
) -> None:
    job_id = create_job(store)
    first = claimed(ledger, job_id)
    ledger.record_success(first, {"n": 1}, next_step="second", duration_ms=1.0)
    again = ledger.claim_step(job_id, "first")
    assert isinstance(again, AlreadySucceeded)
    lost: list[int] = []

    def drop_after_insert(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO STEP_EVENTS") and not lost:
            lost.append(1)
            raise DatabaseUnavailable("server closed the connection unexpectedly")

    sa.event.listen(engine, "after_cursor_execute", drop_after_insert)
    try:
        ledger.note_duplicate(again)
    finally:
        sa.event.remove(engine, "after_cursor_execute", drop_after_insert)

    assert lost == [1]
    kinds = [event.kind for event in store.history(job_id).events]
    assert kinds.count(EventKind.DUPLICATE) == 1


def test_a_fast_path_record_on_a_job_cancelled_meanwhile_keeps_its_result(
    store: JobStore, ledger: StepLedger
) -> None:
    """As in the chained mode: the step acted, so its result is the job's, but the job goes
    no further and nothing is claimed."""
    job_id = create_job(store)
    first = claimed(ledger, job_id)
    store.cancel(job_id, by="test")

    recorded, following = record_and_claim_next(ledger, first)

    assert (recorded.job_state, following) == (JobState.CANCELLED, None)
    job = store.get_job(job_id)
    assert (job.state, job.current_step, job.results) == (
        JobState.CANCELLED,
        "first",
        {"first": {"n": 1}},
    )
    assert [entry.step for entry in store.history(job_id).entries] == ["first"]
