"""The sweeper's statements for map steps' items: the pending items that look lost (left in
the outbox, abandoned, stalled, or held by a broker that lost its queues), taken with SKIP
LOCKED, marked touched and dispatched."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries.common import ACTIVE
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
    under a live lease. Marks them touched and dispatched; returns what to send."""
    item, entry = map_items.c, ledger_entries.c
    abandoned = sa.exists().where(
        entry.key == item.key,
        entry.state == str(StepState.STARTED),
        entry.locked_until < db.utcnow(),
        item.updated_at < entry.locked_until,
    )
    lost = sa.or_(
        sa.and_(
            item.dispatched_at.is_(None),
            item.updated_at < db.utcnow_plus(db.seconds(-relay_after)),
        ),
        abandoned,
        sa.and_(item.updated_at < db.utcnow_plus(db.seconds(-stalled_after)), ~_held_live()),
    )
    return _take_items(dialect_name, lost, limit, pipelines)


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
    dialect_name: str, lost: ColumnElement[bool], limit: int, pipelines: Sequence[str] | None
) -> sa.Update:
    """Take the pending items of active jobs that `lost` says are lost (SKIP LOCKED: sweepers
    at once share them out): mark them touched and dispatched, return what to send."""
    item = map_items.c
    job_ok = [jobs.c.id == item.job_id, jobs.c.state.in_(ACTIVE)]
    if pipelines is not None:
        job_ok.append(jobs.c.pipeline.in_(list(pipelines)))
    chosen = (
        sa.select(item.job_id, item.step, item.item_id)
        .where(item.state == str(ItemState.PENDING), sa.exists().where(*job_ok), lost)
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
