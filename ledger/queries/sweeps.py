"""The sweeper's statements (re-drives, with SKIP LOCKED), the outbox's, retention's, and
those that measure recovery (`oncelery chaos`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries.common import ACTIVE
from ledger.queries.timers import waiting as waiting_on_timer
from ledger.schema import jobs, ledger_entries, maps, step_events
from ledger.types import EventKind, JobState, StepState

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


def _mapping() -> sa.Exists:
    """The job's current step is a map whose items run (or wait for a person): its items are
    re-driven on their own (`queries.take_lost_items`), the fan-in moves the job on."""
    return sa.exists().where(
        maps.c.job_id == jobs.c.id,
        maps.c.step == jobs.c.current_step,
        maps.c.joined_at.is_(None),
    )


def _of(chosen: sa.Select[Any], pipelines: Sequence[str] | None) -> sa.Select[Any]:
    """`chosen`, only of `pipelines` when given: each sweeper takes the jobs it can send (a
    decorated Celery task's are sent by its own app's sweeper, see `jobs.tasks`)."""
    return chosen if pipelines is None else chosen.where(jobs.c.pipeline.in_(list(pipelines)))


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


def take_stalled_jobs(
    dialect_name: str, stalled_after: float, limit: int, pipelines: Sequence[str] | None = None
) -> sa.Update:
    """Claim a batch of unfinished jobs without progress for `stalled_after` seconds and not
    in flight: mark them touched (so the next sweep leaves them alone) and return their step
    to send again. SKIP LOCKED, as every take of the sweeper."""
    stalled = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state.in_(ACTIVE),
            jobs.c.updated_at < db.utcnow_plus(db.seconds(-stalled_after)),
            ~_held_live(dialect_name),
            ~_mapping(),
            ~waiting_on_timer(),
        )
        .order_by(jobs.c.updated_at)
        .limit(limit)
    )
    return _take(dialect_name, _of(stalled, pipelines))


def take_abandoned_jobs(
    dialect_name: str, limit: int, again_after: float, pipelines: Sequence[str] | None = None
) -> sa.Update:
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
    return _take(dialect_name, _of(abandoned, pipelines))


def context_member(
    dialect_name: str, name: str, table: sa.Table | Any = jobs
) -> ColumnElement[str]:
    """A text member of a job's context, written as migration 0006's index on `parent` is
    (the key a literal, not a parameter, so that the index serves it)."""
    if dialect_name == "sqlite":
        path: ColumnElement[str] = sa.literal_column(f"'$.{name}'")
        extracted: ColumnElement[str] = sa.func.json_extract(
            table.c.context, path, type_=sa.String()
        )
        return extracted
    member: ColumnElement[str] = table.c.context.op("->>", return_type=sa.String())(
        sa.literal_column(f"'{name}'")
    )
    return member


def take_unfollowed_jobs(
    dialect_name: str, stalled_after: float, within: float, limit: int, pipelines: Sequence[str]
) -> sa.Update:
    """Claim a batch of jobs of `pipelines` that succeeded in the last `within` seconds, say
    how many calls they hand on to (`context.hands_on`), and that fewer jobs than that name
    as their parent (a `context.parent` equal to their `context.task_id`), untouched for
    `stalled_after` seconds: mark them touched and return them (a decorated Celery task's
    call whose continuation never appeared, or appeared in part: a hand-on to a group cut
    short)."""
    child = jobs.alias("child")
    children = (
        sa.select(sa.func.count())
        .select_from(child)
        .where(
            context_member(dialect_name, "parent", child) == context_member(dialect_name, "task_id")
        )
        .scalar_subquery()
    )
    unfollowed = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state == str(JobState.SUCCEEDED),
            jobs.c.finished_at > db.utcnow_plus(db.seconds(-within)),
            jobs.c.updated_at < db.utcnow_plus(db.seconds(-stalled_after)),
            jobs.c.pipeline.in_(list(pipelines)),
            context_member(dialect_name, "hands_on").is_not(None),
            children < _hands_on(dialect_name),
        )
        .order_by(jobs.c.updated_at)
        .limit(limit)
    )
    return _take(dialect_name, unfollowed)


def _hands_on(dialect_name: str) -> ColumnElement[int]:
    """How many calls a job's call hands on to: `context.hands_on`, a count (a job kept
    before it was one says `true`: at least one)."""
    member = context_member(dialect_name, "hands_on")
    if dialect_name == "sqlite":
        # SQLite's JSON `true` comes out as 1 already.
        return sa.cast(member, sa.Integer)
    return sa.case((member == "true", 1), else_=sa.cast(member, sa.Integer))


def take_jobs_sent_between(
    dialect_name: str,
    before: float,
    after: float | None,
    limit: int,
    pipelines: Sequence[str] | None = None,
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
        ~waiting_on_timer(),
    )
    if after is not None:
        waiting = waiting.where(touched > db.utcnow_plus(db.seconds(-after)))
    return _take(dialect_name, _of(waiting, pipelines).order_by(touched).limit(limit))


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


def take_announced(job_ids: Sequence[UUID]) -> sa.Update:
    """Take the given jobs if they are still in the outbox (another relay may have sent
    them), marking them dispatched; returns their first step to send."""
    return (
        sa.update(jobs)
        .where(
            jobs.c.id.in_(list(job_ids)),
            jobs.c.dispatched_at.is_(None),
            jobs.c.state == str(JobState.PENDING),
        )
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
