"""`StepLedger`: the claim → act → record protocol over idempotency keys, fenced by owner token.

Must not import celery, kombu, jobs or config. On Postgres the happy path of a step is two
statements (claim, record), each one round trip in autocommit on the process's direct
connection (`ledger.direct`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID, uuid4

from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.dead_letters import DeadLetterNote, write_dead_letter
from ledger.direct import for_engine
from ledger.errors import DatabaseUnavailable, FingerprintMismatch, LeaseLost, StepNotInJob
from ledger.types import (
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    EventKind,
    InFlight,
    JobInactive,
    JobState,
    OutcomeUnknown,
    Recorded,
    StepState,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Shortest wait suggested to a claimant that found a live lease, in seconds.
_MIN_IN_FLIGHT_WAIT = 0.5


@dataclass(frozen=True)
class Failure:
    """How a step attempt failed, as recorded in the ledger and the job's history."""

    error: JSON
    #: Seconds until the next attempt, or None when the job is dead-lettered instead.
    retry_in: float | None
    duration_ms: float | None = None
    #: The attempt may have acted before failing (a timeout after sending): the key becomes
    #: `unknown` rather than `failed`, so nobody mistakes it for "nothing happened".
    outcome_unknown: bool = False
    #: Why the job is dead-lettered, when `retry_in` is None.
    reason: DeadLetterReason | None = None

    def __post_init__(self) -> None:
        if self.outcome_unknown and self.retry_in is not None:
            raise ValueError("an attempt whose outcome is unknown is not retried")


class StepLedger:
    """Claims, records and fences steps; usable from plain Python, without Celery.

    Args:
        engine: where the ledger lives (one engine per process).
        lease_seconds: how long a claim stays its owner's before another may take it over.
        unavailable_for: how long a call keeps retrying while the database is unreachable.
    """

    def __init__(
        self, *, engine: Engine, lease_seconds: float, unavailable_for: float = 15.0
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.unavailable_for = unavailable_for
        #: The protocol's hot statements run here, past the engine (Postgres only).
        self.direct = for_engine(engine) if db.is_postgres(engine) else None

    def close(self) -> None:
        """Close the direct connection (the engine is its owner's to dispose of)."""
        if self.direct is not None:
            self.direct.close()

    # --- claim ----------------------------------------------------------------------------

    def claim_step(
        self, job_id: UUID, step: str, *, takeover_expired: bool = True, owner: UUID | None = None
    ) -> ClaimOutcome:
        """Claim a job's step: the key becomes ours, or we learn why not.

        Args:
            job_id: the job.
            step: the step's name; its key comes from the job's plan.
            takeover_expired: whether a key whose owner's lease ran out may be taken over
                (True for exactly-once steps; an at-most-once step's expired key is unknown).
            owner: the owner token; a fresh one unless retrying an ambiguous claim.

        Raises:
            FingerprintMismatch: the key was first used for a different request.
        """
        token = owner or uuid4()
        row = self._retrying(lambda: self._claim_row(job_id, step, token, takeover_expired))
        if row is None:
            return JobInactive(job_id=job_id, step=step, state=self._job_state(job_id))
        return self._decode_claim(job_id, step, token, row, takeover_expired)

    def _claim_row(
        self, job_id: UUID, step: str, owner: UUID, takeover_expired: bool
    ) -> Mapping[str, Any] | None:
        lease = self.lease_seconds
        if self.direct is not None:
            statement = queries.claim_template(takeover_expired)
            return self.direct.one(statement, queries.claim_params(job_id, step, owner, lease))
        with db.transaction(self.engine) as conn:
            job = conn.execute(queries.start_job(job_id, step)).mappings().one_or_none()
            if job is None:
                return None
            if job["key"] is None:
                raise StepNotInJob(job_id, step)
            claim = queries.claim_step(
                conn.dialect.name,
                queries.claim_source(job["key"], job_id, job["fingerprint"]),
                step=step,
                owner=owner,
                lease_seconds=lease,
                takeover_expired=takeover_expired,
            )
            attempts = conn.execute(claim).scalar_one_or_none()
            entry: dict[str, Any] = {}
            if attempts is None:
                lost_to = conn.execute(queries.select_entry_for_claim(job["key"])).mappings()
                entry = dict(lost_to.one_or_none() or {})
            return {**job, "claimed_attempts": attempts, **entry}

    def _decode_claim(
        self, job_id: UUID, step: str, owner: UUID, row: Mapping[str, Any], takeover_expired: bool
    ) -> ClaimOutcome:
        key = row["key"]
        if key is None:
            raise StepNotInJob(job_id, step)
        context, results = row["context"], row["results"]
        if row["claimed_attempts"] is not None:
            return Claim(
                job_id,
                step,
                key,
                owner,
                row["claimed_attempts"],
                context,
                results,
                row["current_step"],
            )
        if row.get("entry_state") is None:
            # Inserted by a concurrent claimant after this statement's snapshot was taken.
            return InFlight(job_id, step, key, retry_in=_MIN_IN_FLIGHT_WAIT)
        if row["entry_step"] != step or row["entry_fingerprint"] != row["fingerprint"]:
            raise FingerprintMismatch(key, job_id, step)
        if row["entry_state"] == StepState.SUCCEEDED:
            return AlreadySucceeded(
                job_id,
                step,
                key,
                row["entry_result"],
                step in results,
                context,
                results,
                row["current_step"],
            )
        return _not_claimed(job_id, step, key, row, takeover_expired)

    def _job_state(self, job_id: UUID) -> JobState | None:
        with db.single_statement(self.engine) as conn:
            found = conn.execute(queries.select_job(job_id)).mappings().one_or_none()
        return JobState(found["state"]) if found is not None else None

    # --- record ---------------------------------------------------------------------------

    def record_success(
        self, claim: Claim, result: JSON, *, next_step: str | None, duration_ms: float | None
    ) -> Recorded:
        """Record the step's result and move the job to `next_step` (or finish it).

        Raises:
            LeaseLost: another owner took the key over; do not continue the chain.
        """
        state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
        return self._record(
            claim,
            entry=(StepState.SUCCEEDED, result, None),
            event=(EventKind.SUCCEEDED, duration_ms, result),
            job=(state, next_step, (claim.step, result)),
        )

    def record_and_claim_next(
        self,
        claim: Claim,
        result: JSON,
        *,
        next_step: str,
        duration_ms: float | None,
        takeover_expired: bool = True,
    ) -> tuple[Recorded, ClaimOutcome | None]:
        """The fast path: record the step and claim `next_step` for a fresh owner at once (one
        statement on Postgres), so this worker goes straight on to the next step.

        Returns:
            The record, and the next step's claim outcome — None when nothing was claimed
            (the job is no longer active, or the record was an earlier ambiguous commit's).

        Raises:
            LeaseLost: another owner took the key over; do not continue the chain.
        """
        if self.direct is None:
            recorded = self.record_success(
                claim, result, next_step=next_step, duration_ms=duration_ms
            )
            if recorded.job_state is not JobState.RUNNING:
                return recorded, None
            return recorded, self.claim_step(
                claim.job_id, next_step, takeover_expired=takeover_expired
            )
        owner = uuid4()
        statement = queries.record_and_claim_template(takeover_expired)
        values = {
            **queries.record_params(
                key=claim.key,
                owner=claim.owner,
                job_id=claim.job_id,
                event=(duration_ms, result),
                job=(JobState.RUNNING, next_step),
                result=(claim.step, result),
            ),
            **queries.claim_params(claim.job_id, next_step, owner, self.lease_seconds),
        }

        direct = self.direct
        row = self._retrying(lambda: direct.one(statement, values))
        if row is None:
            return Recorded(claim.key, self._recorded_before(claim, StepState.SUCCEEDED)), None
        if row["job_state"] is None:
            return Recorded(claim.key, self._job_state(claim.job_id) or JobState.CANCELLED), None
        outcome = self._decode_claim(claim.job_id, next_step, owner, row, takeover_expired)
        return Recorded(claim.key, JobState.RUNNING), outcome

    def record_failure(self, claim: Claim, failure: Failure) -> Recorded:
        """Record a failed attempt: the key is free for a retry, or the job is dead-lettered
        (with a durable dead letter, in the same transaction).

        Raises:
            LeaseLost: another owner took the key over meanwhile.
        """
        if failure.retry_in is None:
            return self._record_dead_letter(claim, failure)
        detail: JSON = {"error": failure.error, "retry_in": round(failure.retry_in, 3)}
        return self._record(
            claim,
            entry=(StepState.FAILED, None, failure.error),
            event=(EventKind.FAILED, failure.duration_ms, detail),
            job=(JobState.RUNNING, claim.step, None),
        )

    def _record_dead_letter(self, claim: Claim, failure: Failure) -> Recorded:
        entry_state = StepState.UNKNOWN if failure.outcome_unknown else StepState.FAILED
        finish = queries.finish_entry(
            claim.key, claim.owner, state=entry_state, result=None, error=failure.error
        )
        letter = DeadLetterNote(
            claim.job_id,
            claim.step,
            claim.key,
            failure.error,
            failure.reason or DeadLetterReason.PERMANENT,
            failure.duration_ms,
        )

        def attempt() -> JobState | None:
            with db.transaction(self.engine) as conn:
                finished = conn.execute(finish).one_or_none()
                if finished is None:
                    return None
                return write_dead_letter(conn, letter, finished.attempts, finished.first_failed_at)

        job_state = self._retrying(attempt)
        if job_state is None:
            job_state = self._recorded_before(claim, entry_state)
        return Recorded(key=claim.key, job_state=job_state)

    def _record(
        self,
        claim: Claim,
        *,
        entry: tuple[StepState, JSON, JSON],
        event: tuple[EventKind, float | None, JSON],
        job: tuple[JobState, str | None, tuple[str, JSON] | None],
    ) -> Recorded:
        entry_state, result, error = entry
        kind, duration_ms, detail = event
        state, current_step, job_result = job

        def attempt() -> JobState | None:
            if self.direct is not None:
                statement = (
                    queries.record_success_template(state is JobState.SUCCEEDED)
                    if kind is EventKind.SUCCEEDED
                    else queries.record_retry_template()
                )
                values = queries.record_params(
                    key=claim.key,
                    owner=claim.owner,
                    job_id=claim.job_id,
                    event=(duration_ms, detail),
                    job=(state, current_step),
                    result=job_result,
                    error=error,
                )
                found = self.direct.one(statement, values)
                return JobState(found["state"]) if found is not None else None
            finished = queries.finish_entry(
                claim.key, claim.owner, state=entry_state, result=result, error=error
            )
            with db.transaction(self.engine) as conn:
                if conn.execute(finished).one_or_none() is None:
                    return None
                after = queries.entry_after_record(claim.key)
                conn.execute(
                    queries.append_event_after(after, claim.job_id, kind, duration_ms, detail)
                )
                advance = queries.advance_job(
                    claim.job_id, after, state=state, current_step=current_step, result=job_result
                )
                return JobState(conn.execute(advance).scalar_one())

        job_state = self._retrying(attempt)
        if job_state is None:
            job_state = self._recorded_before(claim, entry_state)
        logger.debug(
            "recorded %s for %s",
            entry_state,
            claim.key,
            extra={
                "action": "record",
                "job_id": str(claim.job_id),
                "step": claim.step,
                "key": claim.key,
                "attempt": claim.attempt,
            },
        )
        return Recorded(key=claim.key, job_state=job_state)

    def _recorded_before(self, claim: Claim, entry_state: StepState) -> JobState:
        """After a fenced-out record: our own earlier write (an ambiguous commit) or a takeover."""
        with db.single_statement(self.engine) as conn:
            found = conn.execute(queries.select_entry(claim.key)).mappings().one_or_none()
        if found is not None and found["owner"] == claim.owner and found["state"] == entry_state:
            state = self._job_state(claim.job_id)
            if state is not None:
                return state
        raise LeaseLost(claim.key, claim.job_id, claim.step)

    # --- the non-happy paths --------------------------------------------------------------

    def adopt_result(self, outcome: AlreadySucceeded, *, next_step: str | None) -> JobState:
        """Give a job the result recorded under its step's key and move it on.

        Usually the same business request arrived twice (two events for one order): the second
        job reuses the first one's result instead of acting again. It is also how a job whose
        key succeeded but which never moved on (a replay of a step that had in fact succeeded)
        catches up.
        """
        adopt = queries.adopt_result(outcome.job_id, outcome.step, outcome.result, next_step)
        kind = EventKind.DUPLICATE if outcome.recorded_for_this_job else EventKind.DEDUPLICATED
        event = queries.append_event(
            outcome.job_id, outcome.step, kind, key=outcome.key, detail=outcome.result
        )

        def attempt() -> JobState | None:
            with db.transaction(self.engine) as conn:
                adopted: str | None = conn.execute(adopt).scalar_one_or_none()
                if adopted is None:
                    return None
                conn.execute(event)
                return JobState(adopted)

        state = self._retrying(attempt)
        return state if state is not None else (self._job_state(outcome.job_id) or JobState.PENDING)

    def note_duplicate(self, outcome: AlreadySucceeded) -> None:
        """Append a `duplicate` event: a delivery found its key already recorded (the count
        of these is the ledger's keep, in production)."""
        event = queries.append_event(
            outcome.job_id, outcome.step, EventKind.DUPLICATE, key=outcome.key
        )

        def attempt() -> None:
            with db.single_statement(self.engine) as conn:
                conn.execute(event)

        self._retrying(attempt)

    def declare_unknown(self, outcome: OutcomeUnknown, error: JSON) -> bool:
        """Mark an at-most-once key unknown and dead-letter its job: a person decides.

        Fenced by the owner whose lease ran out: if that owner recorded late, or another took
        the key over since the claim looked, nothing changes and False comes back — claim the
        step again to see where it stands.
        """
        letter = DeadLetterNote(
            outcome.job_id, outcome.step, outcome.key, error, DeadLetterReason.OUTCOME_UNKNOWN
        )

        def attempt() -> bool:
            with db.transaction(self.engine) as conn:
                if outcome.owner is not None:
                    marked = conn.execute(queries.mark_unknown(outcome.key, outcome.owner))
                    if marked.one_or_none() is None:
                        return False
                write_dead_letter(conn, letter, outcome.attempts, None)
                return True

        return self._retrying(attempt)

    def dead_letter(
        self,
        job_id: UUID,
        step: str,
        error: JSON,
        *,
        reason: DeadLetterReason,
        key: str | None = None,
    ) -> None:
        """Dead-letter a job at a step it could not claim (its key's fingerprint mismatched)."""
        letter = DeadLetterNote(job_id, step, key, error, reason)

        def attempt() -> None:
            with db.transaction(self.engine) as conn:
                write_dead_letter(conn, letter, 0, None)

        self._retrying(attempt)

    # --- plumbing -------------------------------------------------------------------------

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run `call`, retrying while the database is unavailable (every write here is
        idempotent per owner token, so a retry after an ambiguous commit is safe)."""
        deadline = time.monotonic() + self.unavailable_for
        delay = 0.1
        while True:
            try:
                return call()
            except DatabaseUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "database unavailable, retrying in %.1fs: %s",
                    delay,
                    exc.detail,
                    extra={"action": "db_retry"},
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def _not_claimed(
    job_id: UUID, step: str, key: str, row: Mapping[str, Any], takeover_expired: bool
) -> InFlight | OutcomeUnknown:
    """Why a claim that found an unfinished entry did not take it."""
    if row["entry_state"] == StepState.UNKNOWN:
        return OutcomeUnknown(job_id, step, key, attempts=row["entry_attempts"])
    if row["entry_state"] == StepState.STARTED and row["entry_lease_expired"]:
        if takeover_expired:
            # The snapshot saw an expired lease, yet the claim did not take it over: on
            # Postgres another claimant took it after the snapshot. Look again shortly.
            return InFlight(job_id, step, key, retry_in=_MIN_IN_FLIGHT_WAIT)
        return OutcomeUnknown(
            job_id, step, key, attempts=row["entry_attempts"], owner=row["entry_owner"]
        )
    return InFlight(job_id, step, key, retry_in=_remaining(row["entry_locked_until"]))


def _remaining(locked_until: datetime | None) -> float:
    until = db.as_utc(locked_until)
    if until is None:
        return _MIN_IN_FLIGHT_WAIT
    return max(_MIN_IN_FLIGHT_WAIT, (until - datetime.now(UTC)).total_seconds())
