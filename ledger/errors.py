"""The ledger's exceptions: one root, `LedgerError`, and a subclass per situation.

No driver exception (psycopg, sqlite3) escapes `ledger/`: they are wrapped at the edge.
"""

from __future__ import annotations

from uuid import UUID


class LedgerError(Exception):
    """Root of every error the ledger raises."""


class DatabaseUnavailable(LedgerError):
    """Raised when the database cannot be reached or dropped the connection mid-statement.

    The statement may or may not have been applied (an ambiguous commit); every ledger write
    is idempotent per owner token, so the caller may simply try again.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"database unavailable: {detail}")


class SchemaMissing(LedgerError):
    """Raised when the ledger's tables are not there or not up to date: run `oncelery db
    upgrade` first."""

    def __init__(self) -> None:
        super().__init__("the ledger's schema is missing or out of date; run `oncelery db upgrade`")


class JobNotFound(LedgerError):
    """Raised when a job id names no job."""

    def __init__(self, job_id: UUID | str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id}")


class FingerprintMismatch(LedgerError):
    """Raised when a key is claimed for a request that differs from the one it was first used for.

    A key reused for different input is a bug in how keys are derived, not a duplicate: acting
    on it could, say, skip a charge whose amount changed.
    """

    def __init__(self, key: str, job_id: UUID, step: str) -> None:
        self.key = key
        self.job_id = job_id
        self.step = step
        super().__init__(
            f"idempotency key {key!r} was first used for a different request "
            f"(job {job_id}, step {step!r})"
        )


class LeaseLost(LedgerError):
    """Raised when an owner records a step whose lease another owner took over.

    The late owner (a paused or partitioned worker) must neither record nor continue the chain.
    """

    def __init__(self, key: str, job_id: UUID, step: str) -> None:
        self.key = key
        self.job_id = job_id
        self.step = step
        super().__init__(f"lease on {key!r} (job {job_id}, step {step!r}) was taken over")


class StatementRejected(LedgerError):
    """Raised when the database refuses a statement for what it holds (a value too long, a
    constraint broken): a bug or bad data, which retrying cannot fix."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"the database refused a statement: {detail}")


class ItemConflict(StatementRejected):
    """Raised when an item expands into an id its map has with other content: its record is
    refused (the item fails), since that id already names the other item."""

    def __init__(self, item_id: str, step: str) -> None:
        self.item_id = item_id
        self.detail = f"item id {item_id!r} is in map step {step!r} already, with other content"
        LedgerError.__init__(self, self.detail)


class StepNotInJob(LedgerError):
    """Raised when a job's plan has no key for the step being claimed (a step added to the
    pipeline after the job was created)."""

    def __init__(self, job_id: UUID, step: str) -> None:
        self.job_id = job_id
        self.step = step
        super().__init__(f"job {job_id} has no step {step!r}")


class EventConflict(LedgerError):
    """Raised when an event id is enqueued again with other content than it first had (in an
    earlier call, or earlier in the same input): the same id must mean the same event, so
    nothing of the input that brought it is enqueued.

    Args:
        pipeline: the pipeline the event is for.
        event_id: the event id seen with two contents.
        index: the conflicting event's place in the input, from 0.
    """

    def __init__(self, pipeline: str, event_id: str, index: int) -> None:
        self.pipeline = pipeline
        self.event_id = event_id
        self.index = index
        super().__init__(
            f"event_id {event_id!r} was already enqueued with other content "
            f"(pipeline {pipeline!r}); an event id must always carry the same event"
        )


class DeadLetterNotFound(LedgerError):
    """Raised when a dead letter id names no dead letter."""

    def __init__(self, letter_id: int) -> None:
        self.letter_id = letter_id
        super().__init__(f"no dead letter {letter_id}")
