"""Dead letters on real Postgres and SQLite: written with the failure, listed, replayed once,
settled, purged."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from ledger import (
    JSON,
    Claim,
    DeadLetterNotFound,
    DeadLetterReason,
    DeadLetterState,
    DeadLetterStore,
    EventKind,
    Failure,
    FingerprintMismatch,
    JobState,
    JobStore,
    Refused,
    Reopened,
    Settled,
    StepLedger,
    StepState,
)
from tests.factories import create_job

ERROR: JSON = {"type": "TransientError", "message": "503", "traceback": "Traceback ..."}


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


@pytest.fixture
def ledger(engine: sa.Engine) -> StepLedger:
    return StepLedger(engine=engine, lease_seconds=30)


@pytest.fixture
def letters(engine: sa.Engine) -> DeadLetterStore:
    return DeadLetterStore(engine=engine)


def dead_letter_after_two_failures(
    store: JobStore, ledger: StepLedger, *, unknown: bool = False
) -> uuid.UUID:
    job_id = create_job(store)
    first = ledger.claim_step(job_id, "first")
    assert isinstance(first, Claim)
    ledger.record_success(first, {"n": 1}, next_step="second", duration_ms=1.0)
    for retry_in in (0.1, None):
        claim = ledger.claim_step(job_id, "second")
        assert isinstance(claim, Claim)
        failure = Failure(
            error=ERROR,
            retry_in=retry_in,
            outcome_unknown=unknown and retry_in is None,
            reason=DeadLetterReason.ATTEMPTS_EXHAUSTED if retry_in is None else None,
        )
        ledger.record_failure(claim, failure)
    return job_id


def test_a_dead_letter_is_written_with_the_failure(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    job_id = dead_letter_after_two_failures(store, ledger)

    [letter] = letters.list()
    assert (letter.job_id, letter.pipeline, letter.step) == (job_id, "plain", "second")
    assert (letter.reason, letter.state, letter.attempts) == (
        DeadLetterReason.ATTEMPTS_EXHAUSTED,
        DeadLetterState.OPEN,
        2,
    )
    assert (letter.error_type, letter.message, letter.traceback) == (
        "TransientError",
        "503",
        "Traceback ...",
    )
    assert letter.input == {
        "context": store.get_job(job_id).context,
        "results": {"first": {"n": 1}},
    }
    assert letter.first_failed_at < letter.last_failed_at
    assert letters.count_open() == 1
    assert letters.get(letter.id) == letter
    with pytest.raises(DeadLetterNotFound):
        letters.get(letter.id + 1000)


def test_list_filters(store: JobStore, ledger: StepLedger, letters: DeadLetterStore) -> None:
    dead_letter_after_two_failures(store, ledger)
    [letter] = letters.list()

    assert letters.list(step="first") == []
    assert letters.list(step="second") == [letter]
    assert letters.list(error_type="PermanentError") == []
    assert letters.list(failed_before=letter.last_failed_at) == []
    assert letters.list(failed_after=letter.last_failed_at) == [letter]
    assert letters.list(state=DeadLetterState.REPLAYED) == []


def test_a_replay_reopens_the_job_once(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    job_id = dead_letter_after_two_failures(store, ledger)
    [letter] = letters.list()

    first = letters.replay(letter.id, by="ops", allow_unknown=False)
    second = letters.replay(letter.id, by="ops", allow_unknown=False)

    assert first == Reopened(letter.id, job_id, "plain", "second")
    assert isinstance(second, Refused)
    assert "replayed" in second.reason
    job = store.history(job_id)
    assert (job.job.state, job.job.current_step) == (JobState.RUNNING, "second")
    assert job.events[-1].kind is EventKind.REPLAYED
    claim = ledger.claim_step(job_id, "second")
    assert isinstance(claim, Claim)
    assert claim.attempt == 1  # a replay starts a fresh run of attempts
    assert letters.get(letter.id).closed_by == "ops"


def test_an_unknown_outcome_is_only_replayed_when_allowed(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    job_id = dead_letter_after_two_failures(store, ledger, unknown=True)
    [letter] = letters.list()

    refused = letters.replay(letter.id, by="ops", allow_unknown=False)

    assert isinstance(refused, Refused)
    assert "unknown" in refused.reason
    assert letters.get(letter.id).state is DeadLetterState.OPEN
    assert store.get_job(job_id).state is JobState.DEAD_LETTERED
    assert isinstance(letters.replay(letter.id, by="ops", allow_unknown=True), Reopened)


def test_settling_records_the_result_and_moves_the_job_on(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    job_id = dead_letter_after_two_failures(store, ledger, unknown=True)
    [letter] = letters.list()

    settled = letters.settle(letter.id, by="alice", result={"checked": True}, next_step=None)

    assert settled == Settled(letter.id, job_id, "plain", JobState.SUCCEEDED, None)
    history = store.history(job_id)
    assert history.job.results["second"] == {"checked": True}
    assert [e.state for e in history.entries] == [StepState.SUCCEEDED, StepState.SUCCEEDED]
    assert history.events[-1].detail == {
        "by": "alice",
        "as": "succeeded",
        "dead_letter": letter.id,
        "result": {"checked": True},
    }
    assert isinstance(letters.settle(letter.id, by="alice", result={}, next_step=None), Refused)


def test_purging_an_open_dead_letter_gives_the_job_up(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    job_id = dead_letter_after_two_failures(store, ledger)
    [letter] = letters.list()

    assert letters.purge([letter.id], by="ops").deleted == 1

    assert letters.list(state=None) == []
    history = store.history(job_id)
    assert history.job.state is JobState.CANCELLED
    assert history.events[-1].kind is EventKind.PURGED


def test_resolving_a_fingerprint_mismatch_leaves_the_other_requests_key_alone(
    store: JobStore, ledger: StepLedger, letters: DeadLetterStore
) -> None:
    # Given a job whose step's key another request holds, failed (it will retry)
    first = create_job(store, key_base="shared", context={"n": 1})
    claim = ledger.claim_step(first, "first")
    assert isinstance(claim, Claim)
    ledger.record_failure(claim, Failure(error=ERROR, retry_in=1.0))
    second = create_job(store, key_base="shared", context={"n": 2})
    with pytest.raises(FingerprintMismatch) as found:
        ledger.claim_step(second, "first")
    key = found.value.key
    reason = DeadLetterReason.FINGERPRINT_MISMATCH
    ledger.dead_letter(second, "first", {"message": "reused"}, reason=reason, key=key)
    [letter] = letters.list(job_id=second)

    # When a person resolves the second's letter as succeeded, it is refused: the key is
    # the first request's, still failed, its retry to come
    settled = letters.settle(letter.id, by="ops", result={"x": 1}, next_step="second")
    assert isinstance(settled, Refused), settled
    [entry] = [e for e in store.history(first).entries if e.key == key]
    assert (entry.state, entry.result) == (StepState.FAILED, None)
    assert store.get_job(second).state is JobState.DEAD_LETTERED
