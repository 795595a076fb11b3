"""`StepLedger`: the claim → act → record protocol over idempotency keys, fenced by owner token.

Must not import celery, kombu, jobs or config. On Postgres the happy path of a step is two
statements (claim, record), each one round trip in autocommit on the process's direct
connection (`ledger.direct`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from uuid import UUID, uuid4

from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.dead_letters import DeadLetterNote, write_dead_letter
from ledger.direct import for_engine
from ledger.errors import LeaseLost, LedgerError, StatementRejected, StepNotInJob
from ledger.outcomes import Record, answer, decode_claim, raised
from ledger.read_only_steps import ReadOnlySteps
from ledger.types import (
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    EventKind,
    JobInactive,
    JobState,
    OutcomeUnknown,
    Recorded,
    StepResult,
    StepState,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


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


class StepLedger(ReadOnlySteps):
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
        row = self.retrying(lambda: self._claim_row(job_id, step, token, takeover_expired))
        if row is None:
            return JobInactive(job_id=job_id, step=step, state=self._job_state(job_id))
        return decode_claim(job_id, step, token, row, takeover_expired)

    def claim_steps(
        self, job_ids: Sequence[UUID], step: str, *, takeover_expired: bool = True
    ) -> list[ClaimOutcome | LedgerError]:
        """`claim_step` for several jobs at the same step, in one transaction on Postgres.

        Returns, for each job in order, what `claim_step` would have returned, or the error it
        would have raised (`FingerprintMismatch`, `StepNotInJob`, `StatementRejected`).

        Raises:
            DatabaseUnavailable: the database stayed unreachable; nothing was claimed.
        """
        direct = self.direct
        if direct is None or len(job_ids) <= 1:
            return [
                answer(self.claim_step, job, step, takeover_expired=takeover_expired)
                for job in job_ids
            ]
        owners = [uuid4() for _ in job_ids]
        lease = self.lease_seconds
        rows = self._many(
            queries.claim_template(takeover_expired),
            [queries.claim_params(j, step, o, lease) for j, o in zip(job_ids, owners, strict=True)],
        )
        return [
            answer(self._claim_answer, job, step, owner, row, takeover_expired)
            for job, owner, row in zip(job_ids, owners, rows, strict=True)
        ]

    def _claim_answer(
        self,
        job_id: UUID,
        step: str,
        owner: UUID,
        row: Mapping[str, Any] | LedgerError | None,
        takeover_expired: bool,
    ) -> ClaimOutcome:
        if isinstance(row, LedgerError):
            raise row
        if row is None:
            return JobInactive(job_id=job_id, step=step, state=self._job_state(job_id))
        return decode_claim(job_id, step, owner, row, takeover_expired)

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
        done = StepResult(claim, result, duration_ms)
        [answer] = self.record_successes([done], next_step=next_step)
        return raised(answer)

    def record_successes(
        self, done: Sequence[StepResult], *, next_step: str | None
    ) -> list[Recorded | LedgerError]:
        """`record_success` for several claims of the same step, in one transaction on
        Postgres; for each, its record or the error `record_success` would have raised
        (`LeaseLost`, `StatementRejected`)."""
        state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
        return self._record_many(
            [
                Record(
                    each.claim,
                    entry=(StepState.SUCCEEDED, each.result, None),
                    event=(EventKind.SUCCEEDED, each.duration_ms, each.result),
                    job=(state, next_step, (each.claim.step, each.result)),
                )
                for each in done
            ]
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
            FingerprintMismatch, StepNotInJob: recorded, but the next step cannot be claimed.
        """
        [answer] = self.record_and_claim_next_steps(
            [StepResult(claim, result, duration_ms)],
            next_step=next_step,
            takeover_expired=takeover_expired,
        )
        return raised(answer)

    def record_and_claim_next_steps(
        self, done: Sequence[StepResult], *, next_step: str, takeover_expired: bool = True
    ) -> list[tuple[Recorded, ClaimOutcome | None] | LedgerError]:
        """`record_and_claim_next` for several claims of the same step, in one transaction on
        Postgres; for each, its answer or the error `record_and_claim_next` would have raised."""
        direct = self.direct
        if direct is None:
            return [
                answer(self._record_then_claim, each, next_step, takeover_expired) for each in done
            ]
        owners = [uuid4() for _ in done]
        values = [
            {
                **queries.record_params(
                    key=each.claim.key,
                    owner=each.claim.owner,
                    job_id=each.claim.job_id,
                    event=(each.duration_ms, each.result),
                    job=(JobState.RUNNING, next_step),
                    result=(each.claim.step, each.result),
                ),
                **queries.claim_params(each.claim.job_id, next_step, owner, self.lease_seconds),
            }
            for each, owner in zip(done, owners, strict=True)
        ]
        rows = self._many(queries.record_and_claim_template(takeover_expired), values)
        return [
            answer(self._next_claim_answer, each.claim, next_step, owner, row, takeover_expired)
            for each, owner, row in zip(done, owners, rows, strict=True)
        ]

    def _record_then_claim(
        self, done: StepResult, next_step: str, takeover_expired: bool
    ) -> tuple[Recorded, ClaimOutcome | None]:
        """`record_and_claim_next` without the direct connection (SQLite): two statements."""
        recorded = self.record_success(
            done.claim, done.result, next_step=next_step, duration_ms=done.duration_ms
        )
        if recorded.job_state is not JobState.RUNNING:
            return recorded, None
        claimed = self.claim_step(done.claim.job_id, next_step, takeover_expired=takeover_expired)
        return recorded, claimed

    def _next_claim_answer(
        self,
        claim: Claim,
        next_step: str,
        owner: UUID,
        row: Mapping[str, Any] | LedgerError | None,
        takeover_expired: bool,
    ) -> tuple[Recorded, ClaimOutcome | None]:
        if isinstance(row, LedgerError):
            raise row
        if row is None:
            # The fence refused: a takeover (LeaseLost), or our own earlier commit whose
            # answer was lost, which claimed the next step for this same `owner` too.
            job_state = self._recorded_before(claim, StepState.SUCCEEDED)
            if job_state is not JobState.RUNNING:
                return Recorded(claim.key, job_state), None
            # Claiming again under that owner finds the claim it holds, rather than leaving
            # the key held, for a lease, by an owner no worker has.
            claimed = self.claim_step(
                claim.job_id, next_step, takeover_expired=takeover_expired, owner=owner
            )
            return Recorded(claim.key, job_state), claimed
        job_state = JobState(row["job_state"])
        if job_state is not JobState.RUNNING:
            return Recorded(claim.key, job_state), None
        outcome = decode_claim(claim.job_id, next_step, owner, row, takeover_expired)
        return Recorded(claim.key, JobState.RUNNING), outcome

    def renew_leases(self, claims: Sequence[Claim]) -> list[bool]:
        """Extend the leases of claims still held, by `lease_seconds` from now (a batch whose
        later jobs wait their turn keeps their keys); for each, whether it is still ours."""
        lease = self.lease_seconds
        values = [queries.renew_params(claim.key, claim.owner, lease) for claim in claims]
        template = queries.renew_lease_template()
        if self.direct is not None:
            rows = self._many(template, values)
            return [row is not None and not isinstance(row, LedgerError) for row in rows]
        with db.transaction(self.engine) as conn:
            return [conn.execute(template, each).one_or_none() is not None for each in values]

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

        job_state = self.retrying(attempt)
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
        [answer] = self._record_many([Record(claim, entry=entry, event=event, job=job)])
        return raised(answer)

    def _record_many(self, records: Sequence[Record]) -> list[Recorded | LedgerError]:
        """Record outcomes of one kind (all successes of one step, say): each one round trip
        alone, or one transaction for the lot on Postgres."""
        direct = self.direct
        if direct is None or len(records) == 1:
            return [answer(self._record_alone, record) for record in records]
        rows = self._many(records[0].template(), [record.values() for record in records])
        return [
            answer(self._recorded, record, row) for record, row in zip(records, rows, strict=True)
        ]

    def _record_alone(self, record: Record) -> Recorded:
        return self._recorded(record, self.retrying(lambda: self._record_row(record)))

    def _record_row(self, record: Record) -> Mapping[str, Any] | None:
        """Run one record; the job's new state (as a row), or None if the fence refused it."""
        if self.direct is not None:
            return self.direct.one(record.template(), record.values())
        entry_state, result, error = record.entry
        kind, duration_ms, detail = record.event
        state, current_step, job_result = record.job
        claim = record.claim
        finished = queries.finish_entry(
            claim.key, claim.owner, state=entry_state, result=result, error=error
        )
        with db.transaction(self.engine) as conn:
            if conn.execute(finished).one_or_none() is None:
                return None
            after = queries.entry_after_record(claim.key)
            conn.execute(queries.append_event_after(after, claim.job_id, kind, duration_ms, detail))
            advance = queries.advance_job(
                claim.job_id, after, state=state, current_step=current_step, result=job_result
            )
            return {"state": conn.execute(advance).scalar_one()}

    def _recorded(self, record: Record, row: Mapping[str, Any] | LedgerError | None) -> Recorded:
        """What a record's row means: the job's new state, or (no row) why the fence refused."""
        if isinstance(row, LedgerError):
            raise row
        claim = record.claim
        if row is None:
            job_state = self._recorded_before(claim, record.entry[0])
        else:
            job_state = JobState(row["state"])
        logger.debug(
            "recorded %s for %s",
            record.entry[0],
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

        state = self.retrying(attempt)
        return state if state is not None else (self._job_state(outcome.job_id) or JobState.PENDING)

    def note_duplicate(self, outcome: AlreadySucceeded) -> None:
        """Append a `duplicate` event: a delivery found its key already recorded (the count
        of these is the ledger's keep, in production). Written once, even when retried after
        a commit whose answer was lost."""
        event = queries.append_event_once(
            outcome.job_id, outcome.step, EventKind.DUPLICATE, key=outcome.key, delivery=uuid4()
        )

        def attempt() -> None:
            with db.single_statement(self.engine) as conn:
                conn.execute(event)

        self.retrying(attempt)

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

        return self.retrying(attempt)

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

        self.retrying(attempt)

    # --- plumbing -------------------------------------------------------------------------

    def retrying(self, call: Callable[[], T]) -> T:
        """Run `call`, retrying while the database is unavailable (every write here is
        idempotent per owner token, so a retry after an ambiguous commit is safe)."""
        return db.retry_while_unavailable(call, for_seconds=self.unavailable_for)

    def _many(
        self, template: Any, values: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any] | LedgerError | None]:
        """Run a template once per set of values in one transaction (Postgres)."""
        direct = self.direct
        assert direct is not None
        if len(values) == 1:
            # One job: one autocommit round trip, no transaction around it.
            return [answer(self.retrying, functools.partial(direct.one, template, values[0]))]
        try:
            return list(self.retrying(lambda: direct.many(template, values)))
        except StatementRejected:
            # One run's values were refused, and the transaction with them: run each alone,
            # so only the job they belong to hears of it.
            alone = [functools.partial(direct.one, template, each) for each in values]
            return [answer(self.retrying, run) for run in alone]
