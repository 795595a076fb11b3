"""Statements for what happens around the protocol: dead letters and what people do with them
(replay, resolve, purge), cancellation, the sweeper's re-drives and retention."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.dml import ReturningDelete
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries.common import ACTIVE, json_value
from ledger.schema import dead_letters, jobs, ledger_entries, step_events
from ledger.types import JSON, DeadLetterState, EventKind, JobState, StepState

# --- dead letters -------------------------------------------------------------------------


def insert_dead_letter(values: dict[str, Any]) -> sa.Insert:
    """Write a dead letter; returns its id."""
    return sa.insert(dead_letters).values(values).returning(dead_letters.c.id)


def select_dead_letters(
    *,
    state: DeadLetterState | None,
    step: str | None = None,
    error_type: str | None = None,
    failed_before: datetime | None = None,
    failed_after: datetime | None = None,
    ids: Sequence[int] | None = None,
    job_id: UUID | None = None,
    limit: int | None = None,
) -> sa.Select[Any]:
    """Dead letters, oldest failure first, filtered by state, step, error type, age, id or job."""
    letter = dead_letters.c
    query = sa.select(dead_letters).order_by(letter.last_failed_at, letter.id)
    if state is not None:
        query = query.where(letter.state == str(state))
    if step is not None:
        query = query.where(letter.step == step)
    if error_type is not None:
        query = query.where(letter.error_type == error_type)
    if failed_before is not None:
        query = query.where(letter.last_failed_at < failed_before)
    if failed_after is not None:
        query = query.where(letter.last_failed_at >= failed_after)
    if ids is not None:
        query = query.where(letter.id.in_(list(ids)))
    if job_id is not None:
        query = query.where(letter.job_id == job_id)
    return query.limit(limit) if limit is not None else query


def close_dead_letter(letter_id: int, state: DeadLetterState, by: str) -> sa.Update:
    """Close an open dead letter (replayed or resolved); returns it, or nothing if it was not
    open — which is what makes a second replay of the same dead letter a no-op."""
    letter = dead_letters.c
    return (
        sa.update(dead_letters)
        .where(letter.id == letter_id, letter.state == str(DeadLetterState.OPEN))
        .values(state=str(state), closed_at=db.utcnow(), closed_by=by)
        .returning(letter.job_id, letter.step, letter.key, letter.pipeline)
    )


def delete_dead_letters(letter_ids: Sequence[int]) -> ReturningDelete[Any]:
    """Delete dead letters; returns their job ids."""
    return (
        sa.delete(dead_letters)
        .where(dead_letters.c.id.in_(list(letter_ids)))
        .returning(dead_letters.c.job_id, dead_letters.c.step, dead_letters.c.state)
    )


def count_open_dead_letters() -> sa.Select[Any]:
    """How many dead letters wait for a person."""
    return sa.select(sa.func.count()).where(dead_letters.c.state == str(DeadLetterState.OPEN))


# --- replay and resolve -------------------------------------------------------------------


def reset_entry(key: str, *, from_states: Sequence[StepState]) -> sa.Update:
    """Make a key claimable again, with a fresh attempt count (a replay starts a new run)."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(entry.key == key, entry.state.in_([str(s) for s in from_states]))
        .values(
            state=str(StepState.FAILED),
            attempts=0,
            owner=None,
            locked_until=None,
            first_failed_at=None,
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def settle_entry(key: str, result: JSON) -> sa.Update:
    """Record a person's word that an unknown or failed key did take effect."""
    entry = ledger_entries.c
    return (
        sa.update(ledger_entries)
        .where(
            entry.key == key,
            entry.state.in_([str(StepState.UNKNOWN), str(StepState.FAILED)]),
        )
        .values(
            state=str(StepState.SUCCEEDED),
            result=json_value(result),
            error=None,
            locked_until=None,
            first_failed_at=None,
            finished_at=db.utcnow(),
            updated_at=db.utcnow(),
        )
        .returning(entry.key)
    )


def reopen_job(job_id: UUID, step: str) -> sa.Update:
    """Put a dead-lettered job back to running at `step`; returns it if it was dead-lettered."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == str(JobState.DEAD_LETTERED))
        .values(
            state=str(JobState.RUNNING),
            current_step=step,
            finished_at=None,
            updated_at=db.utcnow(),
        )
        .returning(jobs.c.id)
    )


def move_dead_job_on(job_id: UUID, step: str, result: JSON, next_step: str | None) -> sa.Update:
    """A dead-lettered job whose failed step a person settled: give it the result and move it
    to `next_step` (or finish it); returns its new state."""
    state = JobState.RUNNING if next_step is not None else JobState.SUCCEEDED
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == str(JobState.DEAD_LETTERED))
        .values(
            results=db.json_set_key(jobs.c.results, sa.literal(step), json_value(result)),
            current_step=next_step,
            state=str(state),
            finished_at=db.utcnow() if next_step is None else None,
            updated_at=db.utcnow(),
        )
        .returning(jobs.c.state)
    )


def give_up_dead_job(job_id: UUID) -> sa.Update:
    """A dead-lettered job whose dead letter was purged becomes cancelled; returns it."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == str(JobState.DEAD_LETTERED))
        .values(state=str(JobState.CANCELLED), updated_at=db.utcnow())
        .returning(jobs.c.id)
    )


# --- the sweeper and retention ------------------------------------------------------------


def current_key(dialect_name: str) -> ColumnElement[str]:
    """The idempotency key of a job's current step: `step_keys[current_step]`."""
    if dialect_name == "sqlite":
        # SQLite's JSON path needs the member quoted; `->>` with a bare label is 3.38+.
        path = sa.literal('$."') + jobs.c.current_step + sa.literal('"')
        extracted: ColumnElement[str] = sa.func.json_extract(
            jobs.c.step_keys, path, type_=sa.String()
        )
        return extracted
    indexed: ColumnElement[str] = jobs.c.step_keys[jobs.c.current_step].as_string()
    return indexed


def _held_live(dialect_name: str) -> sa.Exists:
    """The job's current step is claimed and its lease runs: its owner is alive (or was
    moments ago), so it is in flight, not stalled."""
    entry = ledger_entries.c
    return sa.exists().where(
        entry.key == current_key(dialect_name),
        entry.state == str(StepState.STARTED),
        entry.locked_until >= db.utcnow(),
    )


def _take(dialect_name: str, chosen: sa.Select[Any]) -> sa.Update:
    """Lock the `chosen` job rows (SKIP LOCKED: sweepers running at once share the work
    instead of sending the same job twice; only the jobs', never the entries workers claim),
    mark them touched and return their step to send."""
    if dialect_name == "postgresql":
        chosen = chosen.with_for_update(skip_locked=True, of=jobs)
    return (
        sa.update(jobs)
        .where(jobs.c.id.in_(chosen.scalar_subquery()))
        .values(updated_at=db.utcnow())
        .returning(jobs.c.id, jobs.c.pipeline, jobs.c.current_step, jobs.c.state)
    )


def take_stalled_jobs(dialect_name: str, stalled_after: float, limit: int) -> sa.Update:
    """Claim a batch of unfinished jobs without progress for `stalled_after` seconds and not
    in flight: mark them touched (so the next sweep leaves them alone) and return their step
    to send again. SKIP LOCKED, as every take of the sweeper."""
    stalled = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state.in_(ACTIVE),
            jobs.c.updated_at < db.utcnow_plus(db.seconds(-stalled_after)),
            ~_held_live(dialect_name),
        )
        .order_by(jobs.c.updated_at)
        .limit(limit)
    )
    return _take(dialect_name, stalled)


def take_abandoned_jobs(dialect_name: str, limit: int, again_after: float) -> sa.Update:
    """Claim a batch of unfinished jobs whose current step is `started` under a lease that
    expired since the job was last touched — its owner died (a live one renews its lease
    while it acts) and nobody sent the step since — or that is still expired `again_after`
    seconds after the job was last touched (the step sent then never came to be claimed: its
    message was lost too, in a killed worker's prefetch, say): mark them touched, return
    their step.

    Driven by the unfinished jobs (`ix_jobs_state_updated_at`), each joined to its current
    step's entry by primary key.
    """
    entry = ledger_entries.c
    abandoned = (
        sa.select(jobs.c.id)
        .join(ledger_entries, entry.key == current_key(dialect_name))
        .where(
            jobs.c.state.in_(ACTIVE),
            entry.state == str(StepState.STARTED),
            entry.locked_until < db.utcnow(),
            sa.or_(
                jobs.c.updated_at < entry.locked_until,
                jobs.c.updated_at < db.utcnow_plus(db.seconds(-again_after)),
            ),
        )
        .order_by(entry.locked_until)
        .limit(limit)
    )
    return _take(dialect_name, abandoned)


def take_jobs_sent_between(
    dialect_name: str, before: float, after: float | None, limit: int
) -> sa.Update:
    """Claim a batch of unfinished jobs last touched between `after` and `before` seconds ago
    (`after` None: any time before), handed to the broker and not in flight — whose message
    a broker that lost its queues lost: mark them touched and return their step."""
    touched = jobs.c.updated_at
    waiting = sa.select(jobs.c.id).where(
        jobs.c.state.in_(ACTIVE),
        touched < db.utcnow_plus(db.seconds(-before)),
        jobs.c.dispatched_at.is_not(None),
        ~_held_live(dialect_name),
    )
    if after is not None:
        waiting = waiting.where(touched > db.utcnow_plus(db.seconds(-after)))
    return _take(dialect_name, waiting.order_by(touched).limit(limit))


#: History kinds that mean a worker took a step's message off the broker and dealt with it.
DELIVERY_KINDS = (
    EventKind.SUCCEEDED,
    EventKind.FAILED,
    EventKind.DEDUPLICATED,
    EventKind.DEAD_LETTERED,
    EventKind.DUPLICATE,
)


def count_recent_deliveries(window: float) -> sa.Select[Any]:
    """How many step messages workers dealt with in the last `window` seconds (by kind, so
    the `(kind, at)` index answers it)."""
    return sa.select(sa.func.count()).where(
        step_events.c.kind.in_([str(kind) for kind in DELIVERY_KINDS]),
        step_events.c.at > db.utcnow_plus(db.seconds(-window)),
    )


#: History kinds that end a delivery on the fast path as well: the message is done with its job.
ENDING_KINDS = (EventKind.FAILED, EventKind.DEAD_LETTERED, EventKind.DUPLICATE)
#: History kinds a fast-path delivery goes on from, to the job's next step in the same message.
GOING_ON_KINDS = (EventKind.SUCCEEDED, EventKind.DEDUPLICATED)


def count_recent_messages(window: float) -> sa.Select[Any]:
    """How many step messages workers dealt with in the last `window` seconds on the fast
    path, where one message runs its job's steps until the last or a failed one: each
    failed, dead-lettered or duplicate delivery ended one, and each job that recorded a step
    was carried by one more (a job's first message, or the retry after its failure). Read
    by kind, so the `(kind, at)` index answers it."""
    since = step_events.c.at > db.utcnow_plus(db.seconds(-window))
    ended = (
        sa.select(sa.func.count())
        .where(step_events.c.kind.in_([str(kind) for kind in ENDING_KINDS]), since)
        .scalar_subquery()
    )
    carried = (
        sa.select(sa.func.count(sa.distinct(step_events.c.job_id)))
        .where(step_events.c.kind.in_([str(kind) for kind in GOING_ON_KINDS]), since)
        .scalar_subquery()
    )
    return sa.select(ended + carried)


#: The jobs a key must outlive its own job for: they may still claim it (unfinished), or be
#: replayed and claim it (dead-lettered).
KEY_KEEPERS = (*ACTIVE, str(JobState.DEAD_LETTERED))


def select_prunable_jobs(dialect_name: str, older_than: float, limit: int) -> sa.Select[Any]:
    """A batch of succeeded or cancelled jobs untouched for `older_than` seconds, locked for
    their deletion (rows another pruner holds are skipped)."""
    finished = [str(JobState.SUCCEEDED), str(JobState.CANCELLED)]
    batch = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state.in_(finished), jobs.c.updated_at < db.utcnow_plus(db.seconds(-older_than))
        )
        .limit(limit)
    )
    return db.for_update_skip_locked(batch, dialect_name)


def select_keys_kept_for_others(dialect_name: str, job_ids: Sequence[UUID]) -> sa.Select[Any]:
    """The entries of `job_ids` that another job still lists in its plan while it may claim
    them (see `KEY_KEEPERS`): (key, keeper job id), one row per keeper."""
    keeper = jobs.alias("keeper")
    listed = db.json_values(keeper.c.step_keys, dialect_name).alias("listed")
    return (
        sa.select(ledger_entries.c.key, keeper.c.id.label("keeper"))
        .select_from(
            # The plan's values come after their job (a lateral function of it).
            keeper.join(listed, sa.true()).join(
                ledger_entries, ledger_entries.c.key == listed.c.value
            )
        )
        .where(
            ledger_entries.c.job_id.in_(list(job_ids)),
            keeper.c.state.in_(KEY_KEEPERS),
            keeper.c.id.not_in(list(job_ids)),
        )
    )


def hand_entry_to(key: str, job_id: UUID) -> sa.Update:
    """Make another job the holder of a key whose own job is being deleted: its key,
    fingerprint, state and result stay, for the jobs that list it."""
    return (
        sa.update(ledger_entries)
        .where(ledger_entries.c.key == key)
        .values(job_id=job_id, updated_at=db.utcnow())
    )


def delete_jobs(job_ids: Sequence[UUID]) -> sa.Delete:
    """Delete jobs (their entries, events and dead letters go with them)."""
    return sa.delete(jobs).where(jobs.c.id.in_(list(job_ids)))


# --- the outbox -----------------------------------------------------------------------------


def mark_dispatched(job_ids: Sequence[UUID]) -> sa.Update:
    """Note that the jobs' first step reached the broker."""
    return (
        sa.update(jobs)
        .where(jobs.c.id.in_(list(job_ids)), jobs.c.dispatched_at.is_(None))
        .values(dispatched_at=db.utcnow())
    )


def take_undispatched(dialect_name: str, older_than: float, limit: int) -> sa.Update:
    """Take pending jobs whose first step never reached the broker (accepted while it was
    down), marking them dispatched; returns their first step to send."""
    waiting = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.dispatched_at.is_(None),
            jobs.c.state == str(JobState.PENDING),
            jobs.c.created_at < db.utcnow_plus(db.seconds(-older_than)),
        )
        .order_by(jobs.c.created_at)
        .limit(limit)
    )
    waiting = db.for_update_skip_locked(waiting, dialect_name)
    return (
        sa.update(jobs)
        .where(jobs.c.id.in_(waiting.scalar_subquery()))
        .values(dispatched_at=db.utcnow())
        .returning(jobs.c.id, jobs.c.pipeline, jobs.c.current_step, jobs.c.state)
    )


def undo_dispatched(job_ids: Sequence[UUID]) -> sa.Update:
    """Put jobs back in the outbox: their send failed after all."""
    return sa.update(jobs).where(jobs.c.id.in_(list(job_ids))).values(dispatched_at=None)


# --- recovery: what `oncelery chaos` measures -----------------------------------------------


def select_unfinished_steps(dialect_name: str, event_prefix: str) -> sa.Select[Any]:
    """Unfinished jobs whose event id starts with a prefix, each with its current step's
    entry (state, attempts, lease; NULL while unclaimed) and the database's clock."""
    entry = ledger_entries.c
    key = current_key(dialect_name)
    return (
        sa.select(
            jobs.c.id.label("job_id"),
            key.label("key"),
            entry.state,
            entry.attempts,
            entry.locked_until,
            db.utcnow().label("now"),
        )
        .select_from(jobs.outerjoin(ledger_entries, entry.key == key))
        .where(jobs.c.state.in_(ACTIVE), jobs.c.event_id.startswith(event_prefix, autoescape=True))
    )


def select_events_by_event_prefix(event_prefix: str) -> sa.Select[Any]:
    """The history of every job whose event id starts with a prefix, oldest first."""
    return (
        sa.select(step_events)
        .join(jobs, jobs.c.id == step_events.c.job_id)
        .where(jobs.c.event_id.startswith(event_prefix, autoescape=True))
        .order_by(step_events.c.id)
    )
