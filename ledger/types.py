"""Value objects and states of the ledger: jobs, step entries, history events, claim outcomes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias
from uuid import UUID

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


class EventKind(enum.StrEnum):
    """What an entry of a job's append-only history says happened."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEDUPLICATED = "deduplicated"
    DEAD_LETTERED = "dead_lettered"
    LEASE_EXPIRED = "lease_expired"


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


@dataclass(frozen=True)
class JobInactive:
    """The job may not claim steps (finished, dead-lettered, cancelled or missing)."""

    job_id: UUID
    step: str
    state: JobState | None


#: Everything `StepLedger.claim_step` can answer.
ClaimOutcome: TypeAlias = Claim | AlreadySucceeded | InFlight | OutcomeUnknown | JobInactive


@dataclass(frozen=True)
class Recorded:
    """A step's outcome was recorded; the job is now in `job_state`."""

    key: str
    job_state: JobState
