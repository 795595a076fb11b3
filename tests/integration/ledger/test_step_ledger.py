"""The claim → act → record protocol on real Postgres and SQLite, without Celery."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from ledger import (
    JSON,
    AlreadySucceeded,
    Claim,
    DeadLetterReason,
    EventKind,
    Failure,
    FingerprintMismatch,
    InFlight,
    JobInactive,
    JobState,
    JobStore,
    LeaseLost,
    OutcomeUnknown,
    PostgresStepLedger,
    SqliteStepLedger,
    StatementRejected,
    StepLedger,
    StepNotInJob,
    StepResult,
    StepState,
    create_engine,
)
from tests.factories import create_job, new_job


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


@pytest.fixture
def ledger(engine: sa.Engine) -> StepLedger:
    return StepLedger(engine=engine, lease_seconds=30)


def claimed(outcome: object) -> Claim:
    assert isinstance(outcome, Claim), outcome
    return outcome


def test_the_ledger_is_built_for_its_engines_dialect(ledger: StepLedger) -> None:
    postgres = ledger.engine.dialect.name == "postgresql"
    expected = PostgresStepLedger if postgres else SqliteStepLedger

    assert type(ledger) is expected
    assert ledger.reads_unclaimed is postgres


def test_happy_path_records_each_step_and_finishes_the_job(
    store: JobStore, ledger: StepLedger
) -> None:
    job_id = create_job(store)

    first = claimed(ledger.claim_step(job_id, "first"))
    assert first.attempt == 1
    assert first.results == {}
    assert ledger.record_success(
        first, {"n": 1}, next_step="second", duration_ms=1.0
    ).job_state is (JobState.RUNNING)
    second = claimed(ledger.claim_step(job_id, "second"))
    assert second.results == {"first": {"n": 1}}
    assert ledger.record_success(second, {"n": 2}, next_step=None, duration_ms=1.0).job_state is (
        JobState.SUCCEEDED
    )

    history = store.history(job_id)
    assert history.job.state is JobState.SUCCEEDED
    assert history.job.results == {"first": {"n": 1}, "second": {"n": 2}}
    assert history.job.current_step is None
    assert history.job.finished_at is not None
    assert [e.state for e in history.entries] == [StepState.SUCCEEDED, StepState.SUCCEEDED]
    assert [(e.step, e.kind) for e in history.events] == [
        ("first", EventKind.SUCCEEDED),
        ("second", EventKind.SUCCEEDED),
    ]


def test_a_recorded_key_returns_its_result_and_is_not_claimed_again(
    store: JobStore, ledger: StepLedger
) -> None:
    job_id = create_job(store)
    first = claimed(ledger.claim_step(job_id, "first"))
    ledger.record_success(first, {"charge_id": "ch_1"}, next_step="second", duration_ms=1.0)

    repeat = ledger.claim_step(job_id, "first")

    assert isinstance(repeat, AlreadySucceeded)
    assert repeat.result == {"charge_id": "ch_1"}
    assert repeat.recorded_for_this_job
    assert repeat.current_step == "second"


def test_two_connections_racing_for_one_key_let_exactly_one_act(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(2)]
    try:
        ledgers = [StepLedger(engine=e, lease_seconds=30) for e in engines]
        store = JobStore(engine=engines[0])
        for _ in range(20):
            job_id = create_job(store)
            barrier = threading.Barrier(2)
            outcomes: list[object] = []

            def claim(
                ledger: StepLedger,
                job: uuid.UUID = job_id,
                gate: threading.Barrier = barrier,
                seen: list[object] = outcomes,
            ) -> None:
                gate.wait()
                seen.append(ledger.claim_step(job, "first"))

            threads = [threading.Thread(target=claim, args=(ledger,)) for ledger in ledgers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

            assert sum(isinstance(o, Claim) for o in outcomes) == 1, outcomes
            assert sum(isinstance(o, InFlight) for o in outcomes) == 1, outcomes
    finally:
        for engine in engines:
            engine.dispose()


def test_an_expired_lease_is_taken_over_and_the_late_owner_is_fenced(
    engine: sa.Engine, store: JobStore
) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=1.0)
    job_id = create_job(store)
    late = claimed(ledger.claim_step(job_id, "first"))
    assert isinstance(ledger.claim_step(job_id, "first"), InFlight)

    time.sleep(1.2)
    current = claimed(ledger.claim_step(job_id, "first"))
    assert current.attempt == 2

    with pytest.raises(LeaseLost):
        ledger.record_success(late, {"from": "late"}, next_step="second", duration_ms=1.0)
    with pytest.raises(LeaseLost):
        ledger.record_failure(late, Failure(error={"type": "X"}, retry_in=1.0))
    ledger.record_success(current, {"from": "current"}, next_step="second", duration_ms=1.0)
    job = store.get_job(job_id)
    assert job.results == {"first": {"from": "current"}}
    assert job.current_step == "second"


def test_a_key_reused_for_a_different_request_fails_loudly(
    store: JobStore, ledger: StepLedger
) -> None:
    first_job = create_job(store, key_base="order:7", context={"amount": 100})
    ledger.record_success(
        claimed(ledger.claim_step(first_job, "first")), {}, next_step="second", duration_ms=1.0
    )
    other_job = create_job(store, key_base="order:7", context={"amount": 999})

    with pytest.raises(FingerprintMismatch) as raised:
        ledger.claim_step(other_job, "first")
    assert raised.value.key == "order:7:first"


def test_the_same_request_from_another_job_reuses_the_recorded_result(
    store: JobStore, ledger: StepLedger
) -> None:
    first_job = create_job(store, key_base="order:8", context={"amount": 100})
    ledger.record_success(
        claimed(ledger.claim_step(first_job, "first")),
        {"charge_id": "ch_8"},
        next_step="second",
        duration_ms=1.0,
    )
    second_job = create_job(store, key_base="order:8", context={"amount": 100})

    outcome = ledger.claim_step(second_job, "first")
    assert isinstance(outcome, AlreadySucceeded)
    assert not outcome.recorded_for_this_job
    assert ledger.adopt_result(outcome, next_step="second") is JobState.RUNNING

    adopted = store.history(second_job)
    assert adopted.job.results == {"first": {"charge_id": "ch_8"}}
    assert [e.kind for e in adopted.events] == [EventKind.DEDUPLICATED]


def test_a_failed_attempt_frees_the_key_and_counts_attempts(
    store: JobStore, ledger: StepLedger
) -> None:
    job_id = create_job(store)
    first = claimed(ledger.claim_step(job_id, "first"))
    ledger.record_failure(first, Failure(error={"type": "Timeout"}, retry_in=0.5, duration_ms=3.0))

    retry = claimed(ledger.claim_step(job_id, "first"))
    assert retry.attempt == 2
    ledger.record_failure(retry, Failure(error={"type": "Boom"}, retry_in=None))

    history = store.history(job_id)
    assert history.job.state is JobState.DEAD_LETTERED
    assert [e.kind for e in history.events] == [EventKind.FAILED, EventKind.DEAD_LETTERED]
    assert history.events[0].detail == {"error": {"type": "Timeout"}, "retry_in": 0.5}
    assert isinstance(ledger.claim_step(job_id, "first"), JobInactive)


def test_claim_and_record_are_idempotent_per_owner_token(
    store: JobStore, ledger: StepLedger
) -> None:
    """A retry after an ambiguous commit (the first call applied, its answer was lost)."""
    job_id = create_job(store)
    owner = uuid.uuid4()
    first = claimed(ledger.claim_step(job_id, "first", owner=owner))
    again = claimed(ledger.claim_step(job_id, "first", owner=owner))
    assert again.attempt == first.attempt == 1

    ledger.record_success(first, {"n": 1}, next_step="second", duration_ms=1.0)
    repeated = ledger.record_success(again, {"n": 1}, next_step="second", duration_ms=1.0)

    assert repeated.job_state is JobState.RUNNING
    assert len(store.history(job_id).events) == 1


def test_an_at_most_once_key_whose_owner_vanished_is_unknown(
    engine: sa.Engine, store: JobStore
) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=0.2)
    job_id = create_job(store)
    claimed(ledger.claim_step(job_id, "first", takeover_expired=False))
    time.sleep(0.4)

    outcome = ledger.claim_step(job_id, "first", takeover_expired=False)
    assert isinstance(outcome, OutcomeUnknown)
    ledger.declare_unknown(outcome, {"type": "OutcomeUnknown"})

    history = store.history(job_id)
    assert history.job.state is JobState.DEAD_LETTERED
    assert history.entries[0].state is StepState.UNKNOWN
    assert isinstance(ledger.claim_step(job_id, "first"), JobInactive)


def test_a_job_that_is_not_active_claims_nothing(store: JobStore, ledger: StepLedger) -> None:
    job_id = create_job(store)
    ledger.dead_letter(job_id, "first", {"type": "Manual"}, reason=DeadLetterReason.PERMANENT)

    outcome = ledger.claim_step(job_id, "first")

    assert outcome == JobInactive(job_id, "first", JobState.DEAD_LETTERED)
    missing = uuid.uuid4()
    assert ledger.claim_step(missing, "first") == JobInactive(missing, "first", None)


def test_create_jobs_deduplicates_by_event_id(store: JobStore) -> None:
    plan = new_job()
    again = new_job(event_id=plan.event_id, context=plan.context)

    [(job_id, created)] = store.create_jobs([plan])
    assert created
    assert store.create_jobs([again, plan]) == [(job_id, False), (job_id, False)]
    other = new_job()
    [(new_id, new), (same_id, same)] = store.create_jobs([other, other])
    assert (new, same) == (True, False)
    assert new_id == same_id


def test_declaring_unknown_is_fenced_by_the_owner_whose_lease_ran_out(
    engine: sa.Engine, store: JobStore
) -> None:
    """A late owner that records after its lease ran out, but before anyone took the key,
    wins: the step is not declared unknown behind its back."""
    ledger = StepLedger(engine=engine, lease_seconds=0.2)
    job_id = create_job(store)
    late = claimed(ledger.claim_step(job_id, "first", takeover_expired=False))
    time.sleep(0.4)
    outcome = ledger.claim_step(job_id, "first", takeover_expired=False)
    assert isinstance(outcome, OutcomeUnknown)
    assert outcome.owner == late.owner

    ledger.record_success(late, {"late": True}, next_step="second", duration_ms=1.0)

    assert ledger.declare_unknown(outcome, {"type": "OutcomeUnknown"}) is False
    history = store.history(job_id)
    assert history.job.state is JobState.RUNNING
    assert history.entries[0].state is StepState.SUCCEEDED


def test_a_step_missing_from_the_plan_is_named(store: JobStore, ledger: StepLedger) -> None:
    job_id = create_job(store, steps=("first",))

    with pytest.raises(StepNotInJob):
        ledger.claim_step(job_id, "second")


# --- batches: several jobs at the same step, one transaction per stage on Postgres ---------


def test_a_batch_claims_records_and_claims_on_as_each_job_alone_would(
    store: JobStore, ledger: StepLedger
) -> None:
    jobs = [create_job(store) for _ in range(3)]

    claims = [claimed(found) for found in ledger.claim_steps(jobs, "first")]
    answers = ledger.record_and_claim_next_steps(
        [StepResult(claim, {"n": n}, 1.0) for n, claim in enumerate(claims)], next_step="second"
    )
    seconds = []
    for answer in answers:
        assert not isinstance(answer, Exception), answer
        recorded, found = answer
        assert recorded.job_state is JobState.RUNNING
        seconds.append(claimed(found))
    finished = ledger.record_successes(
        [StepResult(claim, {"done": True}, 1.0) for claim in seconds], next_step=None
    )

    assert [getattr(r, "job_state", r) for r in finished] == [JobState.SUCCEEDED] * 3
    for n, job_id in enumerate(jobs):
        job = store.get_job(job_id)
        assert job.results == {"first": {"n": n}, "second": {"done": True}}


def test_in_a_batch_each_job_hears_only_of_its_own_trouble(
    store: JobStore, ledger: StepLedger
) -> None:
    # Given a healthy job, a job already finished, the same job twice, a job reusing a key
    # for a different request, and a job whose plan lacks the step
    healthy = create_job(store)
    finished = create_job(store)
    ledger.dead_letter(finished, "first", {"type": "Manual"}, reason=DeadLetterReason.PERMANENT)
    twice = create_job(store)
    first_user = create_job(store, key_base="order:77", context={"amount": 1})
    ledger.record_success(
        claimed(ledger.claim_step(first_user, "first")), {}, next_step="second", duration_ms=1
    )
    reused = create_job(store, key_base="order:77", context={"amount": 2})
    short = create_job(store, steps=("second",))

    found = ledger.claim_steps([healthy, finished, twice, twice, reused, short], "first")

    assert isinstance(found[0], Claim)
    assert found[1] == JobInactive(finished, "first", JobState.DEAD_LETTERED)
    assert isinstance(found[2], Claim)
    assert isinstance(found[3], InFlight)  # the first copy holds the key
    assert isinstance(found[4], FingerprintMismatch)
    assert isinstance(found[5], StepNotInJob)


def test_a_value_postgres_refuses_fails_only_its_own_job(
    store: JobStore, ledger: StepLedger
) -> None:
    jobs = [create_job(store) for _ in range(3)]
    claims = [claimed(found) for found in ledger.claim_steps(jobs, "first")]
    # JSONB cannot hold NUL characters: Postgres refuses that result (SQLite takes it).
    results: list[JSON] = [{"ok": 1}, {"bad": "nul\u0000here"}, {"ok": 3}]

    answers = ledger.record_successes(
        [StepResult(c, r, 1.0) for c, r in zip(claims, results, strict=True)], next_step="second"
    )

    assert store.get_job(jobs[0]).results == {"first": {"ok": 1}}
    assert store.get_job(jobs[2]).results == {"first": {"ok": 3}}
    if store.engine.dialect.name == "postgresql":
        assert isinstance(answers[1], StatementRejected)
        assert store.get_job(jobs[1]).results == {}


def test_a_batch_record_is_fenced_per_job(engine: sa.Engine, store: JobStore) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=0.2)
    jobs = [create_job(store) for _ in range(2)]
    late, kept = (claimed(found) for found in ledger.claim_steps(jobs, "first"))
    time.sleep(0.4)
    claimed(ledger.claim_step(jobs[0], "first"))  # the first job's key is taken over

    answers = ledger.record_and_claim_next_steps(
        [StepResult(late, {}, 1.0), StepResult(kept, {}, 1.0)], next_step="second"
    )

    assert isinstance(answers[0], LeaseLost)
    assert not isinstance(answers[1], Exception)
    assert isinstance(answers[1][1], Claim)


def test_renewing_leases_keeps_the_keys_still_held(engine: sa.Engine, store: JobStore) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=1.0)
    jobs = [create_job(store) for _ in range(2)]
    lost, held = (claimed(found) for found in ledger.claim_steps(jobs, "first"))
    time.sleep(1.2)
    claimed(ledger.claim_step(jobs[0], "first"))

    assert ledger.renew_leases([lost, held]) == [False, True]
    # Both first leases have run out: only the renewal, 1 s from now, keeps this key held.
    assert isinstance(ledger.claim_step(jobs[1], "first"), InFlight)
