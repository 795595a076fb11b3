"""`StepLedger`: the claim → act → record protocol over idempotency keys, fenced by owner token;
the shared core of `PostgresStepLedger` and `SqliteStepLedger`, which run its statements.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar
from uuid import UUID, uuid4

from sqlalchemy.engine import Engine

from ledger import db, queries, timed_records
from ledger.dead_letters import DeadLetterNote, write_dead_letter
from ledger.errors import LeaseLost, LedgerError
from ledger.limit_types import LimitRules
from ledger.limits import release_if_lost
from ledger.outcomes import Failure, Record, answer, decode_claim, raised
from ledger.signals import KEEP_FOR
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
    Reading,
    ReadResult,
    Recorded,
    SignalWait,
    StepResult,
    StepState,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StepLedger:
    """Claims, records and fences steps; usable from plain Python, without Celery.

    `StepLedger(engine=...)` builds the ledger of the engine's dialect: a `PostgresStepLedger`
    (each protocol statement one round trip on `ledger.direct`, batches in one transaction,
    read-only steps unclaimed) or a `SqliteStepLedger` (the same protocol as a few statements
    in one transaction). Each overrides only the methods that run the protocol's statements.

    Args:
        engine: where the ledger lives (one engine per process).
        lease_seconds: how long a claim stays its owner's before another may take it over.
        unavailable_for: how long a call keeps retrying while the database is unreachable.
    """

    #: Whether read-only steps run unclaimed here (`read_steps`, `record_reads`).
    reads_unclaimed: ClassVar[bool] = False
    #: Seconds a kept signal stays takeable by the waits this ledger moves jobs to (the
    #: runtime sets `ONCELERY_SIGNAL_KEEP_FOR`'s).
    signal_keep_for: float = KEEP_FOR

    def __new__(
        cls,
        *,
        engine: Engine,
        lease_seconds: float,  # noqa: ARG004 - for `__init__`
        unavailable_for: float = 15.0,  # noqa: ARG004 - for `__init__`
    ) -> StepLedger:
        """The ledger of `engine`'s dialect: the one choice of dialect the ledger makes."""
        if cls is not StepLedger:
            return super().__new__(cls)
        # The dialect modules build on this one: imported here, when a ledger is built.
        if db.is_postgres(engine):
            from ledger.step_ledger_postgres import PostgresStepLedger  # noqa: PLC0415

            return super().__new__(PostgresStepLedger)
        from ledger.step_ledger_sqlite import SqliteStepLedger  # noqa: PLC0415

        return super().__new__(SqliteStepLedger)

    def __init__(
        self, *, engine: Engine, lease_seconds: float, unavailable_for: float = 15.0
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.unavailable_for = unavailable_for

    def close(self) -> None:
        """Close what the ledger opened itself (the engine is its owner's to dispose of)."""

    # --- claim ----------------------------------------------------------------------------

    def claim_step(
        self,
        job_id: UUID,
        step: str,
        *,
        takeover_expired: bool = True,
        owner: UUID | None = None,
        limits: LimitRules | None = None,
    ) -> ClaimOutcome:
        """Claim a job's step: the key becomes ours, or we learn why not.

        Args:
            job_id: the job.
            step: the step's name; its key comes from the job's plan.
            takeover_expired: whether a key whose owner's lease ran out may be taken over
                (True for exactly-once steps; an at-most-once step's expired key is unknown).
            owner: the owner token; a fresh one unless retrying an ambiguous claim.
            limits: the step's limits: the claim takes their token and slot first, in the
                same statement (Postgres) or transaction (SQLite), and is not made without
                them (`LimitBusy`).

        Raises:
            FingerprintMismatch: the key was first used for a different request.
        """
        token = owner or uuid4()
        values = queries.claim_params(job_id, step, token, self.lease_seconds)
        if limits is not None:
            values |= limits.params()
        row = self.retrying(lambda: self._claim_row(values, takeover_expired, limits))
        if row is None:
            return JobInactive(job_id=job_id, step=step, state=self._job_state(job_id))
        self._release_if_lost(row, token)
        return decode_claim(job_id, step, token, row, takeover_expired)

    def claim_steps(
        self,
        job_ids: Sequence[UUID],
        step: str,
        *,
        takeover_expired: bool = True,
        limits: LimitRules | None = None,
    ) -> list[ClaimOutcome | LedgerError]:
        """`claim_step` for several jobs at the same step (in one transaction on Postgres).

        Returns, for each job in order, what `claim_step` would have returned, or the error it
        would have raised (`FingerprintMismatch`, `StepNotInJob`, `StatementRejected`).

        Raises:
            DatabaseUnavailable: the database stayed unreachable; nothing was claimed.
        """
        return [
            answer(self.claim_step, job, step, takeover_expired=takeover_expired, limits=limits)
            for job in job_ids
        ]

    def _claim_row(
        self, values: Mapping[str, Any], takeover_expired: bool, limits: LimitRules | None
    ) -> Mapping[str, Any] | None:
        """Run a claim (`queries.claim_params`, with `limits.params()`): the columns of
        `queries.claim_template`, or None when the job is not active."""
        raise NotImplementedError

    def _release_if_lost(self, row: Mapping[str, Any], owner: UUID) -> None:
        """Give back a slot the claim took for a key it did not get (rare: another claimant
        was first after this statement's snapshot)."""
        if row.get("limit_slot") is not None and row.get("claimed_attempts") is None:
            with db.transaction(self.engine) as conn:
                release_if_lost(conn, row, owner)

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
        [found] = self.record_successes([done], next_step=next_step)
        return raised(found)

    def record_successes(
        self,
        done: Sequence[StepResult],
        *,
        next_step: str | None,
        sleep_until: Sequence[datetime | timedelta] | None = None,
        waits: Sequence[SignalWait | None] | None = None,
    ) -> list[Recorded | LedgerError]:
        """`record_success` for several claims of the same step (in one transaction on
        Postgres); for each, its record or the error `record_success` would have raised
        (`LeaseLost`, `StatementRejected`).

        Args:
            sleep_until: `next_step` is a wait step: each job's due time (a delay: from the
                database's clock), its timer set in the transaction of its record (one
                transaction per job).
            waits: with `sleep_until`, for a wait for a signal: what each job waits for. A
                signal kept for it already is taken in that transaction instead of setting
                the timer (`ledger.signals.take_kept`; the record says `signalled`).
        """
        state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
        records = [
            Record(
                each.claim,
                entry=(StepState.SUCCEEDED, each.result, None),
                event=(EventKind.SUCCEEDED, each.duration_ms, each.result),
                job=(state, next_step, (each.claim.step, each.result)),
            )
            for each in done
        ]
        if sleep_until is None or next_step is None:
            return self._record_many(records)
        return [
            answer(timed_records.record_and_wait, self, record, next_step, due, wait)
            for record, due, wait in zip(
                records, sleep_until, waits or [None] * len(records), strict=True
            )
        ]

    def record_and_claim_next_steps(
        self,
        done: Sequence[StepResult],
        *,
        next_step: str,
        takeover_expired: bool = True,
        limits: LimitRules | None = None,
    ) -> list[tuple[Recorded, ClaimOutcome | None] | LedgerError]:
        """The fast path: record each step and claim `next_step` for a fresh owner at once, so
        the worker goes straight on to the next step (one statement per job on Postgres).

        Returns, for each: the record and the next step's claim outcome — None when nothing
        was claimed (the job is no longer active, or the record was an earlier ambiguous
        commit's) — or the error about this job alone (`LeaseLost`: do not continue the chain;
        `FingerprintMismatch`, `StepNotInJob`: recorded, but the next step cannot be claimed).
        `limits`: the next step's, taken by its claim.
        """
        return [
            answer(self._record_then_claim, each, next_step, takeover_expired, limits)
            for each in done
        ]

    def _record_then_claim(
        self,
        done: StepResult,
        next_step: str,
        takeover_expired: bool,
        limits: LimitRules | None,
    ) -> tuple[Recorded, ClaimOutcome | None]:
        recorded = self.record_success(
            done.claim, done.result, next_step=next_step, duration_ms=done.duration_ms
        )
        if recorded.job_state is not JobState.RUNNING:
            return recorded, None
        claimed = self.claim_step(
            done.claim.job_id, next_step, takeover_expired=takeover_expired, limits=limits
        )
        return recorded, claimed

    def renew_leases(self, claims: Sequence[Claim]) -> list[bool]:
        """Extend the leases of claims still held, by `lease_seconds` from now (a batch whose
        later jobs wait their turn keeps their keys); for each, whether it is still ours."""
        lease = self.lease_seconds
        return self._renewed([queries.renew_params(c.key, c.owner, lease) for c in claims])

    def _renewed(self, values: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Run `queries.renew_lease` once per set of values; for each, whether it renewed."""
        raise NotImplementedError

    def record_failure(self, claim: Claim, failure: Failure) -> Recorded:
        """Record a failed attempt: the key is free for a retry, or the job is dead-lettered
        (with a durable dead letter, in the same transaction).

        Raises:
            LeaseLost: another owner took the key over meanwhile.
        """
        if failure.retry_in is None:
            return self._record_dead_letter(claim, failure)
        if failure.retry_timer:
            return timed_records.record_and_arm_retry(self, claim, failure, failure.retry_in)
        detail: JSON = {"error": failure.error, "retry_in": round(failure.retry_in, 3)}
        record = Record(
            claim,
            entry=(StepState.FAILED, None, failure.error),
            event=(EventKind.FAILED, failure.duration_ms, detail),
            job=(JobState.RUNNING, claim.step, None),
        )
        [found] = self._record_many([record])
        return raised(found)

    def _record_dead_letter(self, claim: Claim, failure: Failure) -> Recorded:
        entry_state = StepState.UNKNOWN if failure.outcome_unknown else StepState.FAILED
        finish = queries.finish_entry(entry_state)
        values = queries.finish_params(claim.key, claim.owner, error=failure.error)
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
                finished = conn.execute(finish, values).one_or_none()
                if finished is None:
                    return None
                return write_dead_letter(conn, letter, finished.attempts, finished.first_failed_at)

        job_state = self.retrying(attempt)
        if job_state is None:
            job_state = self._recorded_before(claim, entry_state)
        return Recorded(key=claim.key, job_state=job_state)

    def _record_many(self, records: Sequence[Record]) -> list[Recorded | LedgerError]:
        """Record outcomes of one kind (all successes of one step, say): each one alone (in
        one transaction for the lot on Postgres)."""
        return [answer(self._record_alone, record) for record in records]

    def _record_alone(self, record: Record) -> Recorded:
        return self._recorded(record, self.retrying(lambda: self._record_row(record)))

    def _record_row(self, record: Record) -> Mapping[str, Any] | None:
        """Run one record; the job's new state (as a row), or None if the fence refused it."""
        raise NotImplementedError

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

    # --- read-only steps (Postgres) -------------------------------------------------------

    def read_steps(self, job_ids: Sequence[UUID], step: str) -> list[Reading | None]:
        """For a read-only step: each job that may run it unclaimed as a `Reading`; None for
        a job to claim instead. Only where `reads_unclaimed` (see `PostgresStepLedger`)."""
        raise NotImplementedError("read-only steps run unclaimed on Postgres only")

    def record_reads(
        self,
        done: Sequence[ReadResult],
        *,
        next_step: str | None,
        claim_next: bool,
        takeover_expired: bool = True,
        limits: LimitRules | None = None,
    ) -> list[tuple[Recorded, ClaimOutcome | None] | LedgerError | None]:
        """Record read-only steps' results, fenced by their jobs' current step, and move the
        jobs on (`limits`: the next step's, taken by its claim). Only where
        `reads_unclaimed` (see `PostgresStepLedger`)."""
        raise NotImplementedError("read-only steps run unclaimed on Postgres only")

    # --- the non-happy paths --------------------------------------------------------------

    def adopt_result(
        self,
        outcome: AlreadySucceeded,
        *,
        next_step: str | None,
        sleep_until: datetime | timedelta | None = None,
        wait: SignalWait | None = None,
    ) -> JobState:
        """Give a job the result recorded under its step's key and move it on.

        Usually the same business request arrived twice (two events for one order): the second
        job reuses the first one's result instead of acting again. It is also how a job whose
        key succeeded but which never moved on (a replay of a step that had in fact succeeded)
        catches up. `sleep_until`: `next_step` is a wait step, its timer due then (set in
        the same transaction; `wait`: what it waits for, see `record_successes`; a signal
        kept for it moves it on at once, its next step then published by the signals'
        outbox, `SignalLedger.take_unsent`).
        """
        adopt = queries.move_on_with_result(outcome.job_id, outcome.step, outcome.result, next_step)
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
                if sleep_until is not None and next_step is not None and adopted == "running":
                    taken = timed_records.set_wait(
                        conn, outcome.job_id, next_step, sleep_until, wait, self.signal_keep_for
                    )
                    return taken or JobState(adopted)
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
        started_as: StepState | None = None,
    ) -> None:
        """Dead-letter a job at a step it could not claim (its key's fingerprint mismatched),
        or whose run was ended from outside: then its key, if still `started`, becomes
        `started_as` (`failed`: a replay runs it again; `unknown`: a person decides)."""
        letter = DeadLetterNote(job_id, step, key, error, reason)

        def attempt() -> None:
            with db.transaction(self.engine) as conn:
                ended = write_dead_letter(conn, letter, 0, None)
                if ended is JobState.DEAD_LETTERED and key is not None and started_as is not None:
                    conn.execute(queries.end_started(key, started_as))

        self.retrying(attempt)

    def arm_wait(
        self, job_id: UUID, step: str, due: datetime | timedelta, wait: SignalWait | None
    ) -> JobState | bool:
        """Arm a job's wait from a message of the wait step (`timed_records.arm_wait`)."""
        return timed_records.arm_wait(self, job_id, step, due, wait)

    def retrying(self, call: Callable[[], T]) -> T:
        """Run `call`, retrying while the database is unavailable (every write here is
        idempotent per owner token, so a retry after an ambiguous commit is safe)."""
        return db.retry_while_unavailable(call, for_seconds=self.unavailable_for)
