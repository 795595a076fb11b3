"""The idempotency ledger and the job store: SQLAlchemy Core over Postgres or SQLite.

It knows nothing of Celery (no celery, kombu, jobs or config import) and is usable, and
tested, from plain Python: hand it an engine.
"""

from __future__ import annotations

from ledger.db import create_engine
from ledger.errors import (
    DatabaseUnavailable,
    FingerprintMismatch,
    JobNotFound,
    LeaseLost,
    LedgerError,
    SchemaMissing,
)
from ledger.migrations import current_revision, head_revision, upgrade
from ledger.step_ledger import Failure, StepLedger, StepNotInJob
from ledger.store import JobStore
from ledger.types import (
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    EventKind,
    InFlight,
    Job,
    JobHistory,
    JobInactive,
    JobState,
    NewJob,
    OutcomeUnknown,
    Recorded,
    StepEntry,
    StepEvent,
    StepState,
)

__all__ = [
    "JSON",
    "AlreadySucceeded",
    "Claim",
    "ClaimOutcome",
    "DatabaseUnavailable",
    "EventKind",
    "Failure",
    "FingerprintMismatch",
    "InFlight",
    "Job",
    "JobHistory",
    "JobInactive",
    "JobNotFound",
    "JobState",
    "JobStore",
    "LeaseLost",
    "LedgerError",
    "NewJob",
    "OutcomeUnknown",
    "Recorded",
    "SchemaMissing",
    "StepEntry",
    "StepEvent",
    "StepLedger",
    "StepNotInJob",
    "StepState",
    "create_engine",
    "current_revision",
    "head_revision",
    "upgrade",
]
