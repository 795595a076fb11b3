"""The idempotency ledger and the job store: SQLAlchemy Core over Postgres or SQLite. It knows
nothing of Celery (no celery, kombu, jobs or config import) and is usable, and tested, from
plain Python: hand it an engine."""

from __future__ import annotations

from ledger.db import PostgresLimits, create_engine
from ledger.dead_letters import DeadLetterStore
from ledger.errors import (
    DatabaseUnavailable,
    DeadLetterNotFound,
    EventConflict,
    FingerprintMismatch,
    JobNotFound,
    LeaseLost,
    LedgerError,
    SchemaMissing,
    StatementRejected,
    StepNotInJob,
)
from ledger.job_ends import wait_for_end
from ledger.malformed import MalformedCount, MalformedMessages
from ledger.migrations import current_revision, head_revision, upgrade
from ledger.notices import OUTBOX_CHANNEL, Listener
from ledger.outcomes import Failure
from ledger.stats import Histogram, LedgerStats, Snapshot, StepTiming
from ledger.step_ledger import StepLedger
from ledger.step_ledger_postgres import PostgresStepLedger
from ledger.step_ledger_sqlite import SqliteStepLedger
from ledger.store import JobStore, JobToSend, UnfinishedStep
from ledger.types import (
    FINISHED_JOB_STATES,
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetter,
    DeadLetterReason,
    DeadLetterState,
    EventKind,
    InFlight,
    Job,
    JobHistory,
    JobInactive,
    JobState,
    NewJob,
    OutcomeUnknown,
    Reading,
    ReadResult,
    Recorded,
    Refused,
    Reopened,
    Settled,
    StepEntry,
    StepEvent,
    StepResult,
    StepState,
    first_reading,
)

__all__ = [
    "FINISHED_JOB_STATES",
    "JSON",
    "OUTBOX_CHANNEL",
    "AlreadySucceeded",
    "Claim",
    "ClaimOutcome",
    "DatabaseUnavailable",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterReason",
    "DeadLetterState",
    "DeadLetterStore",
    "EventConflict",
    "EventKind",
    "Failure",
    "FingerprintMismatch",
    "Histogram",
    "InFlight",
    "Job",
    "JobHistory",
    "JobInactive",
    "JobNotFound",
    "JobState",
    "JobStore",
    "JobToSend",
    "LeaseLost",
    "LedgerError",
    "LedgerStats",
    "Listener",
    "MalformedCount",
    "MalformedMessages",
    "NewJob",
    "OutcomeUnknown",
    "PostgresLimits",
    "PostgresStepLedger",
    "ReadResult",
    "Reading",
    "Recorded",
    "Refused",
    "Reopened",
    "SchemaMissing",
    "Settled",
    "Snapshot",
    "SqliteStepLedger",
    "StatementRejected",
    "StepEntry",
    "StepEvent",
    "StepLedger",
    "StepNotInJob",
    "StepResult",
    "StepState",
    "StepTiming",
    "UnfinishedStep",
    "create_engine",
    "current_revision",
    "first_reading",
    "head_revision",
    "upgrade",
    "wait_for_end",
]
