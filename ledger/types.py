"""Value objects and states of the ledger: jobs, step entries, history events, claim outcomes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias
from uuid import UUID

if TYPE_CHECKING:
    from ledger.map_types import MapCounters

#: What a step receives and returns: plain JSON.
JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None


class JobState(enum.StrEnum):
    """Where a job stands."""

    #: Accepted and stored; no step has been claimed yet.
    PENDING = "pending"
    #: A step has been claimed; the job is on its way.
    RUNNING = "running"
    #: Every step succeeded.
    SUCCEEDED = "succeeded"
    #: A step failed for good (or its outcome is unknown); a person decides what happens next.
    DEAD_LETTERED = "dead_lettered"
    #: Stopped by a person before its next step.
    CANCELLED = "cancelled"


#: States in which a job may still claim steps.
ACTIVE_JOB_STATES = (JobState.PENDING, JobState.RUNNING)
#: States a job never leaves by itself.
FINISHED_JOB_STATES = (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)


class StepState(enum.StrEnum):
    """Where one idempotency key stands in the ledger."""

    #: Claimed by an owner whose lease runs until `locked_until`.
    STARTED = "started"
    #: Done; its result is recorded and every later claim returns it.
    SUCCEEDED = "succeeded"
    #: The last attempt failed; the next claim may take the key over.
    FAILED = "failed"
    #: An at-most-once step whose owner vanished between acting and recording.
    UNKNOWN = "unknown"


class TimerKind(enum.StrEnum):
    """What a timer (`ledger.timers`) ends when it fires."""

    #: A sleep step: the job moves on to the step after it.
    SLEEP = "sleep"
    #: A wait for a signal (`jobs.WaitForSignal`): it fires if the signal does not come in
    #: time; a signal that comes first ends it `cancelled` instead (`ledger.signals`).
    SIGNAL_TIMEOUT = "signal_timeout"
    #: A retry whose delay is too long for a broker message: the step is sent again.
    RETRY = "retry"
    #: A step (or map item) waiting for its limit's token or slot: the step is sent again.
    LIMIT = "limit"


class TimerState(enum.StrEnum):
    """Where a timer stands: firing is one compare-and-set from `pending` to `fired`."""

    PENDING = "pending"
    FIRED = "fired"
    #: Its job was cancelled before it fired, or (a `signal_timeout`) the signal it waited
    #: for came first: it never will.
    CANCELLED = "cancelled"


class ItemState(enum.StrEnum):
    """Where one item of a map step stands (its key's own state is in the ledger)."""

    #: Not settled yet: queued, claimed, acting, or retrying.
    PENDING = "pending"
    #: Its act succeeded and is recorded (whether or not it expanded).
    DONE = "done"
    #: It failed for good and was dead-lettered on its own, and is settled: the join reads it
    #: as failed (a replay before the join makes it pending again).
    FAILED = "failed"
    #: It failed for good and was dead-lettered on its own, but its map's policy does not
    #: settle it: the join waits for a person to replay it.
    WAITING = "waiting"


class EventKind(enum.StrEnum):
    """What an entry of a job's append-only history says happened."""

    #: An attempt recorded its result.
    SUCCEEDED = "succeeded"
    #: An attempt failed; another follows after `retry_in` seconds.
    FAILED = "failed"
    #: The key was recorded by another job: its result was adopted, nothing was done again.
    DEDUPLICATED = "deduplicated"
    #: The job stopped at this step for good; a dead letter was written.
    DEAD_LETTERED = "dead_lettered"
    #: A person replayed the dead letter: the job resumes at this step.
    REPLAYED = "replayed"
    #: A person decided an unknown or failed step's outcome (`dlq resolve`).
    RESOLVED = "resolved"
    #: A person cancelled the job.
    CANCELLED = "cancelled"
    #: Every item of a map step was settled: the job moved on to the join (once).
    JOINED = "joined"
    #: A person purged the job's dead letter: the job is given up.
    PURGED = "purged"
    #: The sweeper found the job stalled and sent its step again.
    REDRIVEN = "redriven"
    #: The step the sweeper took to send again did not reach the broker (a decorated task's
    #: call; the next sweep tries again). It does not count as a re-send.
    RESEND_FAILED = "resend_failed"
    #: A delivery found its key already recorded for this job: a duplicate the ledger absorbed.
    DUPLICATE = "duplicate"
    #: The job reached a sleep step: a timer (detail: `until`) will move it on.
    SLEEPING = "sleeping"
    #: The sleep step's timer fired and moved the job on (detail: `due_at`, `fired_at`).
    WOKE = "woke"
    #: The step waits for its limit (detail: `limit`, `kind`, `until`): a timer sends it
    #: again; no attempt was used.
    LIMITED = "limited"
    #: The job reached a wait for a signal (detail: `signal`, `key`, `until`).
    WAITING = "waiting"
    #: The signal came first and moved the job on (detail: the wait's result, `by` signal).
    SIGNALLED = "signalled"
    #: The wait's timeout came first and moved the job on (detail: its result, `by` timeout).
    TIMED_OUT = "timed_out"
    #: A failed attempt's retry timer fired: the step is sent again (detail: `due_at`,
    #: `fired_at`). The failure's event says when it was due (`retry_at`).
    RETRY_DUE = "retry_due"


class DeadLetterState(enum.StrEnum):
    """Where a dead letter stands."""

    #: Waiting for a person.
    OPEN = "open"
    #: Replayed: the job resumed at the failed step.
    REPLAYED = "replayed"
    #: A person decided the step's outcome (`dlq resolve`).
    RESOLVED = "resolved"


class DeadLetterReason(enum.StrEnum):
    """Why a job was dead-lettered."""

    #: The step failed in a way retrying cannot fix (4xx, validation, a declined card, a bug).
    PERMANENT = "permanent"
    #: Every attempt the policy allows failed transiently.
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    #: Attempts kept ending without a record: the step kills its worker.
    WORKER_LOST = "worker_lost"
    #: The step may have acted, and repeating it could act twice (see `StepState.UNKNOWN`).
    OUTCOME_UNKNOWN = "outcome_unknown"
    #: The key was first used for a different request.
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    #: The outbox relay could not route the job: its pipeline is not loaded where it runs.
    UNKNOWN_PIPELINE = "unknown_pipeline"
    #: A decorated task's call was re-sent again and again and never claimed (no worker
    #: has its task, or a changed key template makes its run another call).
    NEVER_CLAIMED = "never_claimed"
    #: Celery's hard time limit killed a decorated task's call mid-run and failed it (its
    #: errbacks ran): it is not re-sent behind its canvas's back.
    TIME_LIMIT = "time_limit"


@dataclass(frozen=True)
class NewJob:
    """A job to create: the pipeline's plan for one event."""

    pipeline: str
    event_id: str
    context: Mapping[str, JSON]
    #: Hash of pipeline and context, copied onto every key the job claims.
    fingerprint: str
    #: The idempotency key of each step, by step name.
    step_keys: Mapping[str, str]
    first_step: str


@dataclass(frozen=True)
class Job:
    """A job as stored."""

    id: UUID
    pipeline: str
    event_id: str
    state: JobState
    context: Mapping[str, JSON]
    fingerprint: str
    step_keys: Mapping[str, str]
    results: Mapping[str, JSON]
    current_step: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class StepEntry:
    """One idempotency key's row in the ledger."""

    key: str
    job_id: UUID
    step: str
    state: StepState
    fingerprint: str
    attempts: int
    result: JSON
    error: JSON
    locked_until: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class StepEvent:
    """One line of a job's history."""

    id: int
    job_id: UUID
    step: str
    key: str | None
    attempt: int | None
    kind: EventKind
    at: datetime
    duration_ms: float | None
    detail: JSON


@dataclass(frozen=True)
class JobHistory:
    """A job with every ledger entry it touched and its events, oldest first."""

    job: Job
    entries: tuple[StepEntry, ...]
    events: tuple[StepEvent, ...]
    #: Its map steps' counters (their items are summed up, not listed).
    maps: tuple[MapCounters, ...] = ()


@dataclass(frozen=True)
class Claim:
    """The key is ours until `lease` ends: act, then record with `owner`."""

    job_id: UUID
    step: str
    key: str
    owner: UUID
    attempt: int
    context: Mapping[str, JSON]
    results: Mapping[str, JSON]
    #: The job's next step before this claim, to tell a duplicate delivery from a fresh one.
    current_step: str | None = None
    #: When the rate limit's token the claim took ahead is due (`time.monotonic()`): act
    #: no earlier. None: at once.
    not_before: float | None = None


@dataclass(frozen=True)
class AlreadySucceeded:
    """The key was recorded before: do not act, reuse `result`."""

    job_id: UUID
    step: str
    key: str
    result: JSON
    #: False when another job recorded the key (the same business request, sent twice).
    recorded_for_this_job: bool
    context: Mapping[str, JSON] = field(default_factory=dict)
    results: Mapping[str, JSON] = field(default_factory=dict)
    current_step: str | None = None


@dataclass(frozen=True)
class InFlight:
    """Another owner holds a live lease on the key: try again after `retry_in` seconds."""

    job_id: UUID
    step: str
    key: str
    retry_in: float


@dataclass(frozen=True)
class OutcomeUnknown:
    """An at-most-once key's owner vanished after claiming: nobody knows if it acted."""

    job_id: UUID
    step: str
    key: str
    attempts: int
    #: The owner whose lease ran out (None when the key was already declared unknown).
    owner: UUID | None = None


class LimitKind(enum.StrEnum):
    """What a limit bounds."""

    RATE = "rate"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True)
class LimitBusy:
    """The step's limit has no token or slot free now: it waits as a timer (nothing was
    claimed, no attempt used). `retry_in` is a first guess; the wait itself decides."""

    job_id: UUID
    step: str
    #: The step's (or item's) idempotency key.
    key: str
    kind: LimitKind
    #: The limit's key, rendered (`customer:42`).
    limit: str
    retry_in: float


@dataclass(frozen=True)
class JobInactive:
    """The job may not claim steps (finished, dead-lettered, cancelled or missing)."""

    job_id: UUID
    step: str
    state: JobState | None


@dataclass(frozen=True)
class RetryPending:
    """The key's last attempt failed and its retry waits as a timer, not due yet: this copy
    of the step's message must not run it early (the timer's firing sends the retry)."""

    job_id: UUID
    step: str
    key: str


#: Everything `StepLedger.claim_step` can answer.
ClaimOutcome: TypeAlias = (
    Claim | AlreadySucceeded | InFlight | OutcomeUnknown | JobInactive | RetryPending | LimitBusy
)


@dataclass(frozen=True)
class Recorded:
    """A step's outcome was recorded; the job is now in `job_state`."""

    key: str
    job_state: JobState
    #: The record moved the job to a wait for a signal that was kept already: the wait took
    #: it at once and the job is past the wait (publish its next step, then
    #: `SignalLedger.mark_sent`).
    signalled: bool = False


@dataclass(frozen=True)
class SignalWait:
    """What a job reaching a wait step waits for: a signal's name and key (`ledger.signals`),
    and the step the signal moves it on to (None: the wait is the last step)."""

    signal: str
    key: str
    then: str | None


@dataclass(frozen=True)
class DeadLetter:
    """A job that stopped for good at a step, as a person sees it."""

    id: int
    job_id: UUID
    pipeline: str
    step: str
    key: str | None
    state: DeadLetterState
    reason: DeadLetterReason
    error_type: str
    message: str
    traceback: str | None
    #: What the step received: the job's context and the earlier steps' results.
    input: JSON
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    closed_at: datetime | None
    closed_by: str | None


@dataclass(frozen=True)
class Reopened:
    """A dead letter's job was put back to running at `step`: send that step now."""

    letter_id: int
    job_id: UUID
    pipeline: str
    step: str
    #: The item of a map step the dead letter was (send that item, not the step).
    item_id: str | None = None


@dataclass(frozen=True)
class Settled:
    """A person settled a dead letter's step as succeeded; the job is now in `job_state`."""

    letter_id: int
    job_id: UUID
    pipeline: str
    job_state: JobState
    next_step: str | None
    #: The item of a map step the dead letter was (settled as done; `next_step` is set when
    #: that joined the map).
    item_id: str | None = None


@dataclass(frozen=True)
class Purged:
    """What a purge did: how many dead letters it deleted, and those it left, and why."""

    deleted: int
    refused: list[Refused]


@dataclass(frozen=True)
class Refused:
    """A dead letter was left as it was, and why."""

    letter_id: int
    reason: str


@dataclass(frozen=True)
class StepResult:
    """A claimed step that succeeded: its result and how long it took, to be recorded."""

    claim: Claim
    result: JSON
    duration_ms: float | None


@dataclass(frozen=True)
class Reading:
    """A read-only step about to run unclaimed: what it needs, and its attempt's number."""

    job_id: UUID
    step: str
    key: str
    attempt: int
    context: Mapping[str, JSON]
    results: Mapping[str, JSON]
    #: Taken from the job's first message rather than read (see `first_reading`): its record
    #: also requires the step's key to have no entry yet, as when the job was created.
    assumed: bool = False


def first_reading(job_id: UUID, step: str, key: str, context: Mapping[str, JSON]) -> Reading:
    """What a read of a job just created would find at its first step (a read-only one): its
    context, no results, no attempt yet. The record finds out if that no longer holds."""
    return Reading(job_id, step, key, 1, context, {}, assumed=True)


@dataclass(frozen=True)
class ReadResult:
    """A read-only step that succeeded unclaimed: its result, to be recorded."""

    reading: Reading
    result: JSON
    duration_ms: float | None
