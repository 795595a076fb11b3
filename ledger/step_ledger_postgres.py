"""`PostgresStepLedger`: the step protocol on Postgres, each claim or record one statement on
the process's direct connection (`ledger.direct`), a batch one transaction, read-only steps
unclaimed. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from uuid import UUID, uuid4

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.direct import for_engine
from ledger.errors import LedgerError, StatementRejected
from ledger.limit_types import LimitRules
from ledger.outcomes import Record, answer, decode_claim, reading_of
from ledger.step_ledger import StepLedger
from ledger.types import (
    Claim,
    ClaimOutcome,
    JobInactive,
    JobState,
    Reading,
    ReadResult,
    Recorded,
    StepResult,
    StepState,
)

#: A statement's row, or the error about its job alone, or None (it answered no row).
_Row = Mapping[str, Any] | LedgerError | None


class PostgresStepLedger(StepLedger):
    """`StepLedger` on Postgres: build it as `StepLedger(engine=...)`."""

    reads_unclaimed: ClassVar[bool] = True

    def __init__(
        self, *, engine: Engine, lease_seconds: float, unavailable_for: float = 15.0
    ) -> None:
        super().__init__(
            engine=engine, lease_seconds=lease_seconds, unavailable_for=unavailable_for
        )
        #: The protocol's statements run here, past the engine.
        self.direct = for_engine(engine)

    def close(self) -> None:
        """Close the direct connection (the engine is its owner's to dispose of)."""
        self.direct.close()

    # --- claim ----------------------------------------------------------------------------

    def _claim_row(
        self, values: Mapping[str, Any], takeover_expired: bool, limits: LimitRules | None
    ) -> Mapping[str, Any] | None:
        return self.direct.one(queries.claim_template(takeover_expired, _shape(limits)), values)

    def claim_steps(
        self,
        job_ids: Sequence[UUID],
        step: str,
        *,
        takeover_expired: bool = True,
        limits: LimitRules | None = None,
    ) -> list[ClaimOutcome | LedgerError]:
        if len(job_ids) <= 1:
            return super().claim_steps(
                job_ids, step, takeover_expired=takeover_expired, limits=limits
            )
        owners = [uuid4() for _ in job_ids]
        lease = self.lease_seconds
        taken = limits.params() if limits is not None else {}
        rows = self._many(
            queries.claim_template(takeover_expired, _shape(limits)),
            [
                queries.claim_params(j, step, o, lease) | taken
                for j, o in zip(job_ids, owners, strict=True)
            ],
        )
        return [
            answer(self._claim_answer, job, step, owner, row, takeover_expired)
            for job, owner, row in zip(job_ids, owners, rows, strict=True)
        ]

    def _claim_answer(
        self, job_id: UUID, step: str, owner: UUID, row: _Row, takeover_expired: bool
    ) -> ClaimOutcome:
        if isinstance(row, LedgerError):
            raise row
        if row is None:
            return JobInactive(job_id=job_id, step=step, state=self._job_state(job_id))
        self._release_if_lost(row, owner)
        return decode_claim(job_id, step, owner, row, takeover_expired)

    # --- record ---------------------------------------------------------------------------

    def _record_many(self, records: Sequence[Record]) -> list[Recorded | LedgerError]:
        if len(records) == 1:
            return super()._record_many(records)
        template = queries.record_template(*records[0].shape)
        rows = self._many(template, [record.values() for record in records])
        return [
            answer(self._recorded, record, row) for record, row in zip(records, rows, strict=True)
        ]

    def _record_row(self, record: Record) -> Mapping[str, Any] | None:
        return self.direct.one(queries.record_template(*record.shape), record.values())

    def record_and_claim_next_steps(
        self,
        done: Sequence[StepResult],
        *,
        next_step: str,
        takeover_expired: bool = True,
        limits: LimitRules | None = None,
    ) -> list[tuple[Recorded, ClaimOutcome | None] | LedgerError]:
        owners = [uuid4() for _ in done]
        taken = limits.params() if limits is not None else {}
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
                **taken,
            }
            for each, owner in zip(done, owners, strict=True)
        ]
        template = queries.record_and_claim_template(takeover_expired, _shape(limits))
        rows = self._many(template, values)
        return [
            answer(
                self._next_claim_answer, each.claim, next_step, owner, row, takeover_expired, limits
            )
            for each, owner, row in zip(done, owners, rows, strict=True)
        ]

    def _next_claim_answer(
        self,
        claim: Claim,
        next_step: str,
        owner: UUID,
        row: _Row,
        takeover_expired: bool,
        limits: LimitRules | None,
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
                claim.job_id,
                next_step,
                takeover_expired=takeover_expired,
                owner=owner,
                limits=limits,
            )
            return Recorded(claim.key, job_state), claimed
        job_state = JobState(row["job_state"])
        if job_state is not JobState.RUNNING:
            return Recorded(claim.key, job_state), None
        self._release_if_lost(row, owner)
        outcome = decode_claim(claim.job_id, next_step, owner, row, takeover_expired)
        return Recorded(claim.key, JobState.RUNNING), outcome

    def _renewed(self, values: Sequence[Mapping[str, Any]]) -> list[bool]:
        rows = self._many(queries.renew_lease(), values)
        return [row is not None and not isinstance(row, LedgerError) for row in rows]

    # --- read-only steps ------------------------------------------------------------------

    def read_steps(self, job_ids: Sequence[UUID], step: str) -> list[Reading | None]:
        """For a read-only step: each job that may run it unclaimed — active, at `step`, its
        key new or after a failed attempt — as a `Reading`; None for a job to claim instead
        (whatever else it is, the claim says)."""
        values = {"p_job_ids": list(job_ids), "p_step_key": step}
        rows = self.retrying(lambda: self.direct.rows(queries.read_jobs_template(), values))
        by_id = {row["id"]: row for row in rows}
        return [reading_of(by_id.get(job_id), job_id, step) for job_id in job_ids]

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
        jobs on to `next_step` (claiming it, with `claim_next`, and taking its `limits`), in
        one transaction.

        Returns, for each: the record and the next step's claim outcome (None without
        `claim_next`); None when the job had moved on (another delivery recorded the step, or
        the job stopped: nothing was written); or the error about this job alone.
        """
        owners = [uuid4() for _ in done]
        claiming = next_step if claim_next else None
        taken = limits.params() if limits is not None and claim_next else {}
        values = [
            self._read_values(each, owner, next_step, claiming) | taken
            for each, owner in zip(done, owners, strict=True)
        ]
        shape = _shape(limits) if claim_next else None
        template = queries.record_read_template(
            next_step is not None, claim_next, takeover_expired, shape
        )
        rows = self._many(template, values)
        return [
            answer(self._read_answer, each.reading, owner, row, claiming, takeover_expired, limits)
            for each, owner, row in zip(done, owners, rows, strict=True)
        ]

    def _read_values(
        self, done: ReadResult, owner: UUID, next_step: str | None, claiming: str | None
    ) -> dict[str, Any]:
        """The parameters of a read-only step's record (and of its next step's claim)."""
        reading = done.reading
        values = queries.read_only_params(
            job_id=reading.job_id,
            step=reading.step,
            owner=owner,
            result=done.result,
            duration_ms=done.duration_ms,
            next_step=next_step,
            ran_on=(reading.key, reading.context),
            assumed=reading.assumed,
        )
        if claiming is not None:
            values |= queries.claim_params(reading.job_id, claiming, owner, self.lease_seconds)
        return values

    def _read_answer(
        self,
        reading: Reading,
        owner: UUID,
        row: _Row,
        next_step: str | None,
        takeover_expired: bool,
        limits: LimitRules | None = None,
    ) -> tuple[Recorded, ClaimOutcome | None] | None:
        if isinstance(row, LedgerError):
            raise row
        if row is None:
            return self._read_recorded_before(reading, owner, next_step, takeover_expired, limits)
        recorded = Recorded(reading.key, JobState(row["job_state"]))
        if next_step is None or row["key"] is None:
            # Nothing claimed: the chained mode, the last step, or a job that stopped.
            return recorded, None
        self._release_if_lost(row, owner)
        return recorded, decode_claim(reading.job_id, next_step, owner, row, takeover_expired)

    def _read_recorded_before(
        self,
        reading: Reading,
        owner: UUID,
        next_step: str | None,
        takeover_expired: bool,
        limits: LimitRules | None,
    ) -> tuple[Recorded, ClaimOutcome | None] | None:
        """After a read-only record that moved nothing: our own earlier commit (an ambiguous
        one, retried), or another delivery's record (None)."""
        with db.single_statement(self.engine) as conn:
            found = conn.execute(queries.select_entry(reading.key)).mappings().one_or_none()
        if found is None or found["owner"] != owner or found["state"] != StepState.SUCCEEDED:
            return None
        state = self._job_state(reading.job_id) or JobState.CANCELLED
        recorded = Recorded(reading.key, state)
        if next_step is None or state is not JobState.RUNNING:
            return recorded, None
        # Our commit claimed the next step for this same owner: claiming again returns it.
        claim = self.claim_step(
            reading.job_id, next_step, takeover_expired=takeover_expired, owner=owner, limits=limits
        )
        return recorded, claim

    # --- running statements ---------------------------------------------------------------

    def _many(self, template: sa.ClauseElement, values: Sequence[Mapping[str, Any]]) -> list[_Row]:
        """Run a template once per set of values, in one transaction."""
        direct = self.direct
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


def _shape(limits: LimitRules | None) -> queries.LimitsShape | None:
    return limits.shape if limits is not None else None
