"""The claim's statements, each built once per shape and run with `claim_params`: a job's step
key inserted as started for an owner, or taken over from a failed (or expired) attempt."""

from __future__ import annotations

import functools
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import CTE, ColumnElement, FromClause

from ledger import db
from ledger.queries.common import ANY_ID, param
from ledger.queries.job_rows import start_job
from ledger.queries.limits import LimitsShape, in_claim
from ledger.queries.timers import retry_timer_pending
from ledger.schema import ledger_entries
from ledger.types import StepState


def claim_params(job_id: UUID, step: str, owner: UUID, lease_seconds: float) -> dict[str, Any]:
    """The parameters of a claim of `step` of a job for `owner`."""
    return {
        "p_job_id": job_id,
        "p_step": step,
        "p_step_key": step,
        "p_owner": owner,
        "p_lease": lease_seconds,
    }


@functools.cache
def claim_template(takeover_expired: bool, limits: LimitsShape | None = None) -> sa.Select[Any]:
    """Postgres: start the job, claim its step and read the existing entry in one statement
    (taking the step's limits' token and slot first, with `limits`)."""
    job = start_job().cte("job")
    claimed, existing, columns = claim_from(job, takeover_expired, limits)
    return sa.select(*columns).select_from(
        job.outerjoin(claimed, sa.true()).outerjoin(existing, existing.c.key == job.c.key)
    )


@functools.cache
def claim_key_template(takeover_expired: bool) -> Any:
    """SQLite: claim the key `p_key` (fingerprint `p_fingerprint`) that `start_job` answered;
    returns `attempts` when the key is now ours (SQLite has no data-modifying CTE, so its
    claim is this statement after `start_job`)."""
    row: list[ColumnElement[Any]] = [
        param("key", "", sa.String()),
        param("job_id", ANY_ID, sa.Uuid()),
        param("fingerprint", "", sa.String()),
    ]
    # SQLite needs a WHERE in INSERT … SELECT … ON CONFLICT to parse it unambiguously.
    source = sa.select(*row).where(sa.true())
    return _claim_key(sqlite.insert, source, takeover_expired, retry_fence=True)


def claim_from(
    job: CTE, takeover_expired: bool, limits: LimitsShape | None = None
) -> tuple[CTE, FromClause, list[ColumnElement[Any]]]:
    """Postgres: claim the key of `job` (a CTE returning the started job's row): the claim,
    the entry as it stood when the statement began (what the claim found if it lost), and the
    columns `claim_template` answers with. With `limits`, the claim is made only if the
    step's limits grant a token and a slot (`queries.limits.in_claim`), in the same
    statement."""
    granted, limit_columns = in_claim(job, limits, takeover_expired) if limits else ([], [])
    claimed = _claim_key(
        postgresql.insert,
        # A job whose plan lacks the step claims nothing (the caller raises StepNotInJob).
        sa.select(job.c.key, job.c.id, job.c.fingerprint).where(job.c.key.is_not(None), *granted),
        takeover_expired,
        retry_fence=True,
    ).cte("claimed")
    existing = ledger_entries.alias("existing")
    columns = [
        job.c.context,
        job.c.results,
        job.c.key,
        job.c.fingerprint,
        job.c.current_step,
        claimed.c.attempts.label("claimed_attempts"),
        *_entry_columns(existing),
        *limit_columns,
    ]
    return claimed, existing, columns


def claim_key_from(insert: Any, source: sa.Select[Any], takeover_expired: bool) -> Any:
    """Claim the key that `source` yields as (key, job_id, fingerprint), with the dialect's
    `insert`, as a step's key is claimed (a map step's items are: `queries.maps`) but for
    the retry timer's fence (an item's retry is a countdown); returns `attempts` when the key
    is now ours."""
    return _claim_key(insert, source, takeover_expired, retry_fence=False)


def entry_columns(entry: FromClause) -> list[ColumnElement[Any]]:
    """The columns of an entry a claim found, as `decode_claim` reads them."""
    return _entry_columns(entry)


def select_entry_for_claim(key: str) -> sa.Select[Any]:
    """The entry a claim lost to, with whether its lease has run out."""
    return sa.select(*_entry_columns(ledger_entries)).where(ledger_entries.c.key == key)


def _entry_columns(entry: FromClause) -> list[ColumnElement[Any]]:
    return [
        entry.c.job_id.label("entry_job_id"),
        entry.c.step.label("entry_step"),
        entry.c.state.label("entry_state"),
        entry.c.fingerprint.label("entry_fingerprint"),
        entry.c.result.label("entry_result"),
        entry.c.attempts.label("entry_attempts"),
        entry.c.owner.label("entry_owner"),
        entry.c.locked_until.label("entry_locked_until"),
        (entry.c.locked_until < db.utcnow()).label("entry_lease_expired"),
    ]


_CLAIM_COLUMNS = [
    "key",
    "job_id",
    "fingerprint",
    "step",
    "state",
    "owner",
    "locked_until",
    "attempts",
    "started_at",
    "created_at",
    "updated_at",
]


def _claim_key(
    insert: Any, source: sa.Select[Any], takeover_expired: bool, *, retry_fence: bool
) -> Any:
    """Insert a key as started for `p_owner` (at `p_step`, leased for `p_lease` seconds), or
    take over a failed key (or an expired one if allowed), with the dialect's `insert`; with
    `retry_fence`, not a failed key whose retry waits as a pending timer (a stray copy of the
    step's message would run it before its `Retry-After`).

    `source` yields one row of (key, job_id, fingerprint). The conflict branch only fires for
    the same fingerprint and step, so a key reused for different input is never taken over.
    Re-claiming with the same owner (a retry after an ambiguous commit) keeps the attempt count.
    Returns `attempts` when the key is now ours, nothing otherwise.
    """
    source = source.add_columns(
        param("step", "", sa.String()),
        sa.literal(str(StepState.STARTED)),
        param("owner", ANY_ID, sa.Uuid()),
        db.utcnow_plus(param("lease", 0.0, sa.Float())),
        sa.literal(1),
        db.utcnow(),
        db.utcnow(),
        db.utcnow(),
    )
    statement = insert(ledger_entries).from_select(_CLAIM_COLUMNS, source)
    entry, excluded = ledger_entries.c, statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[entry.key],
        set_=_taken_over(excluded),
        where=sa.and_(
            entry.fingerprint == excluded.fingerprint,
            entry.step == excluded.step,
            sa.or_(*_takeable(excluded, takeover_expired, retry_fence)),
        ),
    ).returning(entry.attempts)


def _takeable(
    excluded: Any, takeover_expired: bool, retry_fence: bool
) -> list[ColumnElement[bool]]:
    """Which existing entries a claim takes over: a failed one (with `retry_fence`, unless
    its retry timer is pending), our own (a retry after an ambiguous commit) and, if allowed,
    one whose lease expired."""
    entry = ledger_entries.c
    started = entry.state == str(StepState.STARTED)
    failed: ColumnElement[bool] = entry.state == str(StepState.FAILED)
    if retry_fence:
        # Read only on a conflict with a failed key, by the timers' unique (job, step, kind).
        failed = sa.and_(failed, ~retry_timer_pending(excluded.job_id, excluded.step))
    takeable = [failed, sa.and_(started, entry.owner == excluded.owner)]
    if takeover_expired:
        takeable.append(sa.and_(started, entry.locked_until < db.utcnow()))
    return takeable


def _taken_over(excluded: Any) -> dict[str, Any]:
    """What a claim writes over an entry it takes: the new owner and lease, one more attempt
    (the same count for the same owner)."""
    entry = ledger_entries.c
    return {
        "job_id": excluded.job_id,
        "state": excluded.state,
        "owner": excluded.owner,
        "locked_until": excluded.locked_until,
        "attempts": sa.case(
            (entry.owner == excluded.owner, entry.attempts), else_=entry.attempts + 1
        ),
        "error": None,
        "started_at": excluded.started_at,
        "finished_at": None,
        "updated_at": excluded.updated_at,
    }
