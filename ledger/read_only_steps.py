"""The ledger's calls for read-only steps (Postgres): read the jobs instead of claiming keys,
and record the results fenced by each job's current step. A part of `StepLedger`.

Must not import celery, kombu, jobs or config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from uuid import UUID, uuid4

from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.direct import DirectStatements
from ledger.errors import LedgerError
from ledger.outcomes import answer, decode_claim, reading_of
from ledger.types import (
    ClaimOutcome,
    JobState,
    Reading,
    ReadResult,
    Recorded,
    StepState,
)

T = TypeVar("T")


class _Ledger(Protocol):
    """What these calls use of the `StepLedger` they are part of."""

    engine: Engine
    lease_seconds: float
    direct: DirectStatements | None

    def retrying(self, call: Callable[[], T]) -> T: ...

    def claim_step(
        self, job_id: UUID, step: str, *, takeover_expired: bool = ..., owner: UUID | None = ...
    ) -> ClaimOutcome: ...

    def _many(
        self, template: Any, values: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any] | LedgerError | None]: ...

    def _job_state(self, job_id: UUID) -> JobState | None: ...

    def _read_answer(
        self,
        reading: Reading,
        owner: UUID,
        row: Mapping[str, Any] | LedgerError | None,
        next_step: str | None,
        takeover_expired: bool,
    ) -> tuple[Recorded, ClaimOutcome | None] | None: ...

    def _read_recorded_before(
        self, reading: Reading, owner: UUID, next_step: str | None, takeover_expired: bool
    ) -> tuple[Recorded, ClaimOutcome | None] | None: ...


class ReadOnlySteps:
    """`StepLedger`'s calls for read-only steps."""

    @property
    def reads_unclaimed(self: _Ledger) -> bool:
        """Whether read-only steps run unclaimed here (Postgres); elsewhere they are claimed."""
        return self.direct is not None

    def read_steps(self: _Ledger, job_ids: Sequence[UUID], step: str) -> list[Reading | None]:
        """For a read-only step: each job that may run it unclaimed — active, at `step`, its
        key new or after a failed attempt — as a `Reading`; None for a job to claim instead
        (whatever else it is, the claim says). Only where `reads_unclaimed`.
        """
        direct = self.direct
        assert direct is not None, "read-only steps run unclaimed on Postgres only"
        values = {"p_job_ids": list(job_ids), "p_step_key": step}
        rows = self.retrying(lambda: direct.rows(queries.read_jobs_template(), values))
        by_id = {row["id"]: row for row in rows}
        return [reading_of(by_id.get(job_id), job_id, step) for job_id in job_ids]

    def record_reads(
        self: _Ledger,
        done: Sequence[ReadResult],
        *,
        next_step: str | None,
        claim_next: bool,
        takeover_expired: bool = True,
    ) -> list[tuple[Recorded, ClaimOutcome | None] | LedgerError | None]:
        """Record read-only steps' results, fenced by their jobs' current step, and move the
        jobs on to `next_step` (claiming it, with `claim_next`), in one transaction.

        Returns, for each: the record and the next step's claim outcome (None without
        `claim_next`); None when the job had moved on (another delivery recorded the step, or
        the job stopped: nothing was written); or the error about this job alone.
        """
        direct = self.direct
        assert direct is not None, "read-only steps run unclaimed on Postgres only"
        owners = [uuid4() for _ in done]
        values = []
        for each, owner in zip(done, owners, strict=True):
            job_id = each.reading.job_id
            params = queries.read_only_params(
                job_id=job_id,
                step=each.reading.step,
                owner=owner,
                result=each.result,
                duration_ms=each.duration_ms,
                next_step=next_step,
                ran_on=(each.reading.key, each.reading.context),
                assumed=each.reading.assumed,
            )
            if claim_next and next_step is not None:
                params |= queries.claim_params(job_id, next_step, owner, self.lease_seconds)
            values.append(params)
        template = queries.record_read_template(next_step is not None, claim_next, takeover_expired)
        rows = self._many(template, values)
        claiming = next_step if claim_next else None
        return [
            answer(self._read_answer, each.reading, owner, row, claiming, takeover_expired)
            for each, owner, row in zip(done, owners, rows, strict=True)
        ]

    def _read_answer(
        self: _Ledger,
        reading: Reading,
        owner: UUID,
        row: Mapping[str, Any] | LedgerError | None,
        next_step: str | None,
        takeover_expired: bool,
    ) -> tuple[Recorded, ClaimOutcome | None] | None:
        if isinstance(row, LedgerError):
            raise row
        if row is None:
            return self._read_recorded_before(reading, owner, next_step, takeover_expired)
        recorded = Recorded(reading.key, JobState(row["job_state"]))
        if next_step is None or row["key"] is None:
            # Nothing claimed: the chained mode, the last step, or a job that stopped.
            return recorded, None
        return recorded, decode_claim(reading.job_id, next_step, owner, row, takeover_expired)

    def _read_recorded_before(
        self: _Ledger, reading: Reading, owner: UUID, next_step: str | None, takeover_expired: bool
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
            reading.job_id, next_step, takeover_expired=takeover_expired, owner=owner
        )
        return recorded, claim
