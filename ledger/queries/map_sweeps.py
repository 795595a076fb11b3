"""The sweeper's statements for map steps' items: the pending items that look lost (left in
the outbox, abandoned, stalled, or held by a broker that lost its queues), taken with SKIP
LOCKED, marked touched and dispatched."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries.common import ACTIVE
from ledger.queries.maps import checked
from ledger.schema import jobs, ledger_entries, map_items
from ledger.types import ItemState, StepState


def take_lost_items(
    dialect_name: str,
    *,
    stalled_after: float,
    relay_after: float,
    limit: int,
    pipelines: Sequence[str] | None,
) -> sa.Update:
    """Take a batch of pending items of active jobs that look lost, SKIP LOCKED: left in the
    outbox for `relay_after` seconds, abandoned (their key started under a lease that expired
    since the item was last touched), or untouched for `stalled_after` seconds and not held
    under a live lease. Marks them touched and dispatched; returns what to send.

    Each kind is found from its own index, up to `limit` of each — the outbox's items by age
    (`ix_map_items_outbox`), the started keys whose lease ran out (`ix_ledger_entries_started`),
    the pending items by age — never by reading every pending item."""
    item, entry = map_items.c, ledger_entries.c
    # Checked on the rows each index finds (see `checked`): a plain condition on state, or a
    # join to the job, lets the planner read every item of a map its statistics call small.
    pending, active = item.state == _PENDING, checked(_active_job(pipelines))
    outbox = (
        sa.select(item.key)
        .where(
            pending,
            item.dispatched_at.is_(None),
            item.updated_at < db.utcnow_plus(db.seconds(-relay_after)),
            active,
        )
        .order_by(item.updated_at)
        .limit(limit)
    )
    abandoned = (
        sa.select(item.key)
        .select_from(ledger_entries.join(map_items, item.key == entry.key))
        .where(
            entry.state == _STARTED,
            entry.locked_until < db.utcnow(),
            checked(pending),
            checked(item.updated_at < entry.locked_until),
            active,
        )
        .limit(limit)
    )
    stalled = (
        sa.select(item.key)
        .where(
            pending,
            item.updated_at < db.utcnow_plus(db.seconds(-stalled_after)),
            ~_held_live(),
            active,
        )
        .order_by(item.updated_at)
        .limit(limit)
    )
    found = [sa.select(each.subquery().c.key) for each in (outbox, abandoned, stalled)]
    lost = item.key.in_(sa.union(*found).subquery().select())
    # Found by key (`ix_map_items_key`).
    return _take_items(dialect_name, lost, limit, pipelines, checks=checked(pending) & active)


#: The states the partial indexes name, as literals: a bound parameter would not let
#: Postgres prove that an index's predicate holds (a generic plan, once prepared).
_PENDING: ColumnElement[str] = sa.literal_column(f"'{ItemState.PENDING}'")
_STARTED: ColumnElement[str] = sa.literal_column(f"'{StepState.STARTED}'")


def _active_job(pipelines: Sequence[str] | None) -> ColumnElement[bool]:
    """The item's job is active (and of one of `pipelines`, if given)."""
    job_ok = [jobs.c.id == map_items.c.job_id, jobs.c.state.in_(ACTIVE)]
    if pipelines is not None:
        job_ok.append(jobs.c.pipeline.in_(list(pipelines)))
    return sa.exists().where(*job_ok)


def take_items_sent_between(
    dialect_name: str,
    before: float,
    after: float | None,
    limit: int,
    pipelines: Sequence[str] | None,
) -> sa.Update:
    """Take a batch of pending items last touched between `after` and `before` seconds ago
    (`after` None: any time before), handed to the broker and not held under a live lease —
    whose message a broker that lost its queues lost (as `take_jobs_sent_between`)."""
    touched = map_items.c.updated_at
    lost = sa.and_(
        map_items.c.dispatched_at.is_not(None),
        touched < db.utcnow_plus(db.seconds(-before)),
        ~_held_live(),
        touched > db.utcnow_plus(db.seconds(-after)) if after is not None else sa.true(),
    )
    return _take_items(dialect_name, lost, limit, pipelines)


def _held_live() -> sa.Exists:
    """The item's key is started under a live lease: its owner is alive."""
    entry = ledger_entries.c
    return sa.exists().where(
        entry.key == map_items.c.key,
        entry.state == str(StepState.STARTED),
        entry.locked_until >= db.utcnow(),
    )


def _take_items(
    dialect_name: str,
    lost: ColumnElement[bool],
    limit: int,
    pipelines: Sequence[str] | None,
    *,
    checks: ColumnElement[bool] | None = None,
) -> sa.Update:
    """Take the pending items of active jobs that `lost` says are lost (SKIP LOCKED: sweepers
    at once share them out): mark them touched and dispatched, return what to send. `checks`:
    those two conditions, if given as the caller words them."""
    item = map_items.c
    if checks is None:
        checks = sa.and_(item.state == str(ItemState.PENDING), _active_job(pipelines))
    chosen = (
        sa.select(item.job_id, item.step, item.item_id)
        .where(checks, lost)
        .order_by(item.updated_at)
        .limit(limit)
    )
    if dialect_name == "postgresql":
        chosen = chosen.with_for_update(skip_locked=True, of=map_items)
    taken = chosen.subquery("lost")
    return (
        sa.update(map_items)
        .where(
            item.job_id == taken.c.job_id,
            item.step == taken.c.step,
            item.item_id == taken.c.item_id,
        )
        .values(updated_at=db.utcnow(), dispatched_at=db.utcnow())
        .returning(
            item.job_id,
            item.step,
            item.item_id,
            sa.select(jobs.c.pipeline).where(jobs.c.id == item.job_id).scalar_subquery(),
        )
    )
