"""The step protocol's outcomes: a claim's, read from its row; a failed attempt (`Failure`) and
the record to write (with its statement's parameters); a batch's answers job by job.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from sqlalchemy.engine import RowMapping

from ledger import db, queries
from ledger.errors import (
    FingerprintMismatch,
    LeaseLost,
    LedgerError,
    StatementRejected,
    StepNotInJob,
)
from ledger.map_types import ItemClaim, ItemFound, ItemSettled
from ledger.types import (
    ACTIVE_JOB_STATES,
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    EventKind,
    InFlight,
    ItemState,
    JobInactive,
    JobState,
    LimitBusy,
    LimitKind,
    OutcomeUnknown,
    Reading,
    RetryPending,
    StepState,
)

T = TypeVar("T")
P = ParamSpec("P")

#: Shortest wait suggested to a claimant that found a live lease, in seconds.
MIN_IN_FLIGHT_WAIT = 0.5
#: Shortest and longest wait for a concurrency limit's slot, in seconds: its holder's lease
#: may run much longer than its step, so a waiter looks again within the longest.
MIN_SLOT_WAIT = 0.2
MAX_SLOT_WAIT = 0.5
#: What a call about one job of a batch may raise that concerns that job alone.
_ONE_JOBS_ERRORS = (FingerprintMismatch, StepNotInJob, StatementRejected, LeaseLost)


def decode_claim(
    job_id: UUID, step: str, owner: UUID, row: Mapping[str, Any], takeover_expired: bool
) -> ClaimOutcome:
    """What a claim statement's row says: the key is `owner`'s now, or why not.

    Raises:
        StepNotInJob: the job's plan has no such step.
        FingerprintMismatch: the key was first used for a different request.
    """
    key = row["key"]
    if key is None:
        raise StepNotInJob(job_id, step)
    context, results = row["context"], row["results"]
    current_step = row["current_step"]
    if row["claimed_attempts"] is not None:
        attempts = row["claimed_attempts"]
        not_before = hold_until(row.get("limit_hold"))
        return Claim(job_id, step, key, owner, attempts, context, results, current_step, not_before)
    busy = limit_busy(job_id, step, key, row)
    if busy is not None:
        return busy
    if row.get("entry_state") is None:
        # Inserted by a concurrent claimant after this statement's snapshot was taken.
        return InFlight(job_id, step, key, retry_in=MIN_IN_FLIGHT_WAIT)
    if row["entry_step"] != step or row["entry_fingerprint"] != row["fingerprint"]:
        raise FingerprintMismatch(key, job_id, step)
    if row["entry_state"] == StepState.SUCCEEDED:
        result, ours = row["entry_result"], step in results
        return AlreadySucceeded(job_id, step, key, result, ours, context, results, current_step)
    if row["entry_state"] == StepState.FAILED:
        # A claim takes a failed key over unless its retry timer is pending (on Postgres,
        # else another claimant took it since the snapshot, and runs it).
        return RetryPending(job_id, step, key)
    return not_claimed(job_id, step, key, row, takeover_expired)


def hold_until(hold: float | None) -> float | None:
    """When a claim whose rate limit's token is `hold` seconds ahead may act."""
    return time.monotonic() + hold if hold else None


def limit_busy(job_id: UUID, step: str, key: str, row: Mapping[str, Any]) -> LimitBusy | None:
    """The limit a claim's row says refused it: its limits were tried (the key was free to
    claim) and a token or a slot was not there."""
    if not row.get("limit_checked") or row["claimed_attempts"] is not None:
        return None
    if "limit_hold" in row and row["limit_hold"] is None:
        retry = max(float(row["rate_retry"] or 0.0), 0.0)
        return LimitBusy(job_id, step, key, LimitKind.RATE, row["rate_key"], retry)
    if "limit_slot" in row and row["limit_slot"] is None:
        lease_left = float(row["slot_retry"]) if row["slot_retry"] is not None else MAX_SLOT_WAIT
        retry = min(max(lease_left, MIN_SLOT_WAIT), MAX_SLOT_WAIT)
        return LimitBusy(job_id, step, key, LimitKind.CONCURRENCY, row["slot_key"], retry)
    return None


def not_claimed(
    job_id: UUID, step: str, key: str, row: Mapping[str, Any], takeover_expired: bool
) -> InFlight | OutcomeUnknown:
    """Why a claim that found an unfinished entry did not take it."""
    if row["entry_state"] == StepState.UNKNOWN:
        return OutcomeUnknown(job_id, step, key, attempts=row["entry_attempts"])
    if row["entry_state"] == StepState.STARTED and row["entry_lease_expired"]:
        if takeover_expired:
            # The snapshot saw an expired lease, yet the claim did not take it over: on
            # Postgres another claimant took it after the snapshot. Look again shortly.
            return InFlight(job_id, step, key, retry_in=MIN_IN_FLIGHT_WAIT)
        return OutcomeUnknown(
            job_id, step, key, attempts=row["entry_attempts"], owner=row["entry_owner"]
        )
    return InFlight(job_id, step, key, retry_in=_remaining(row["entry_locked_until"]))


def decode_item_claim(  # noqa: PLR0911 - one answer per thing a claim can find
    item: tuple[UUID, str, str],
    owner: UUID,
    attempts: int | None,
    row: RowMapping | None,
    takeover_expired: bool,
    not_before: float | None = None,
) -> ItemFound:
    """What an item's claim found (`queries.select_items_for_claim`, and the `attempts` its
    claim returned if the key is now `owner`'s): the claim, or why not, as `decode_claim`
    decodes a step's.

    Raises:
        FingerprintMismatch: the key was first used for another request.
    """
    job_id, step, item_id = item
    if row is None:
        return ItemSettled(job_id, step, item_id, None)
    key = row["key"]
    if row["job_state"] not in ACTIVE_JOB_STATES:
        return JobInactive(job_id, step, JobState(row["job_state"]))
    context, results = row["context"], row["results"]
    if attempts is not None:
        return ItemClaim(
            job_id,
            step,
            key,
            owner,
            attempts,
            context,
            results,
            not_before=not_before,
            item_id=item_id,
            item=row["item"],
        )
    if row["item_state"] != ItemState.PENDING:
        settled = ItemState(row["item_state"])
        return ItemSettled(job_id, step, item_id, settled, row["current_step"])
    if row["entry_state"] is None:
        return InFlight(job_id, step, key, retry_in=MIN_IN_FLIGHT_WAIT)
    if row["entry_step"] != step or row["entry_fingerprint"] != row["fingerprint"]:
        raise FingerprintMismatch(key, job_id, step)
    if row["entry_state"] == StepState.SUCCEEDED:
        ours = row["entry_job_id"] == job_id
        return AlreadySucceeded(job_id, step, key, row["entry_result"], ours, context, results)
    return not_claimed(job_id, step, key, dict(row), takeover_expired)


def reading_of(row: Mapping[str, Any] | None, job_id: UUID, step: str) -> Reading | None:
    """What a read of a job says of a read-only step: run it unclaimed (a `Reading`), or
    None — claim it instead (the job stopped or moved on, the key is held or done, the plan
    lacks the step: the claim tells which)."""
    if row is None or row["key"] is None or row["current_step"] != step:
        return None
    if row["state"] not in (JobState.PENDING, JobState.RUNNING):
        return None
    if row["entry_state"] not in (None, StepState.FAILED):
        return None
    if row["entry_state"] is not None and (
        row["entry_step"] != step or row["entry_fingerprint"] != row["fingerprint"]
    ):
        return None
    attempt = (row["entry_attempts"] or 0) + 1
    return Reading(job_id, step, row["key"], attempt, row["context"], row["results"])


def _remaining(locked_until: datetime | None) -> float:
    until = db.as_utc(locked_until)
    if until is None:
        return MIN_IN_FLIGHT_WAIT
    return max(MIN_IN_FLIGHT_WAIT, (until - datetime.now(UTC)).total_seconds())


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
    #: The retry waits as a timer row (`TimerKind.RETRY`, due `retry_in` seconds from the
    #: database's clock), set in the record's transaction, instead of a broker message.
    retry_timer: bool = False

    def __post_init__(self) -> None:
        if self.outcome_unknown and self.retry_in is not None:
            raise ValueError("an attempt whose outcome is unknown is not retried")
        if self.retry_timer and self.retry_in is None:
            raise ValueError("only a retry waits as a timer")


@dataclass(frozen=True)
class Record:
    """One attempt's outcome to record: on its key, in its job's history, on its job."""

    claim: Claim
    entry: tuple[StepState, JSON, JSON]
    event: tuple[EventKind, float | None, JSON]
    job: tuple[JobState, str | None, tuple[str, JSON] | None]

    @property
    def shape(self) -> tuple[EventKind, bool]:
        """Which record statement it takes: its event's kind, and whether it ends the job."""
        return self.event[0], self.job[0] is JobState.SUCCEEDED

    def values(self) -> dict[str, Any]:
        """The record statement's parameters."""
        _, _, error = self.entry
        _, duration_ms, detail = self.event
        state, current_step, result = self.job
        return queries.record_params(
            key=self.claim.key,
            owner=self.claim.owner,
            job_id=self.claim.job_id,
            event=(duration_ms, detail),
            job=(state, current_step),
            result=result,
            error=error,
        )

    def finish_values(self) -> dict[str, Any]:
        """The parameters of its entry's `finish_entry` run alone (SQLite)."""
        _, result, error = self.entry
        return queries.finish_params(self.claim.key, self.claim.owner, result=result, error=error)


def answer(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | LedgerError:
    """`call(...)`, or the error it raised about its job alone (a batch's other jobs go on)."""
    try:
        return call(*args, **kwargs)
    except _ONE_JOBS_ERRORS as exc:
        return exc


def raised(found: T | LedgerError) -> T:
    """A batch's answer for one job as the single call gives it: the error raised."""
    if isinstance(found, LedgerError):
        raise found
    return found
