"""`SqliteStepLedger`: the step protocol on SQLite, each claim or record a few statements in
one transaction (SQLite has no data-modifying CTE). Must not import celery, kombu, jobs or
config."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from ledger import db, queries
from ledger.errors import StepNotInJob
from ledger.limit_types import LimitRules
from ledger.limits import claimable, refused, take_limits
from ledger.outcomes import Record
from ledger.queries.common import ANY_ID, param
from ledger.queries.timers import retry_timer_pending
from ledger.step_ledger import StepLedger


class SqliteStepLedger(StepLedger):
    """`StepLedger` on SQLite: build it as `StepLedger(engine=...)`."""

    def _claim_row(
        self, values: Mapping[str, Any], takeover_expired: bool, limits: LimitRules | None
    ) -> Mapping[str, Any] | None:
        with db.transaction(self.engine) as conn:
            job = conn.execute(queries.start_job(), values).mappings().one_or_none()
            if job is None:
                return None
            if job["key"] is None:
                raise StepNotInJob(values["p_job_id"], values["p_step"])
            claim = queries.claim_key_template(takeover_expired)
            found = {**values, "p_key": job["key"], "p_fingerprint": job["fingerprint"]}
            entry: dict[str, Any] = {}
            taken: dict[str, Any] = {}
            if limits is not None:
                # As on Postgres: the limits are taken first, only for a key free to claim.
                entry = self._entry(conn, job["key"])
                pending = functools.partial(self._retry_pending, conn, values)
                if claimable(entry, found, takeover_expired, retry_pending=pending):
                    taken = take_limits(conn, limits, found, context=job["context"])
                    if refused(taken):
                        return {**job, "claimed_attempts": None, **entry, **taken}
            attempts = conn.execute(claim, found).scalar_one_or_none()
            if attempts is None and not entry:
                entry = self._entry(conn, job["key"])
            return {**job, "claimed_attempts": attempts, **entry, **taken}

    @staticmethod
    def _retry_pending(conn: Any, values: Mapping[str, Any]) -> bool:
        """The claimed step's retry waits as a pending timer (the claim's retry fence)."""
        job_id, step = param("job_id", ANY_ID, sa.Uuid()), param("step", "", sa.String())
        pending = sa.select(retry_timer_pending(job_id, step))
        return bool(conn.execute(pending, values).scalar_one())

    @staticmethod
    def _entry(conn: Any, key: str) -> dict[str, Any]:
        """The entry a claim finds (none: an empty mapping)."""
        lost_to = conn.execute(queries.select_entry_for_claim(key)).mappings()
        return dict(lost_to.one_or_none() or {})

    def _record_row(self, record: Record) -> Mapping[str, Any] | None:
        finish, event, advance = queries.record_statements(*record.shape)
        values = record.values()
        with db.transaction(self.engine) as conn:
            if conn.execute(finish, record.finish_values()).one_or_none() is None:
                return None
            conn.execute(event, values)
            return {"state": conn.execute(advance, values).scalar_one()}

    def _renewed(self, values: Sequence[Mapping[str, Any]]) -> list[bool]:
        renew = queries.renew_lease()
        with db.transaction(self.engine) as conn:
            return [conn.execute(renew, each).one_or_none() is not None for each in values]
