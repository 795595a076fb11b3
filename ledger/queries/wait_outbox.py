"""The outbox of the moves past a wait: a fired timer's row or a signal's row records the
step a job left, and stays unsent (`dispatched_at` NULL) until the step it moved on to is
published. The statements both tables share: take the rows left there, put them back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.schema import jobs


def taken(dialect_name: str, chosen: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
    """The ids `chosen` selects, for an UPDATE to take: on Postgres its rows locked, SKIP
    LOCKED, in a materialized CTE read once. As a plain `IN (subquery)` the planner may run
    the subquery again for each row the UPDATE scans (a semi join), each run locking the next
    `LIMIT` rows: one round of the timer loop took every due timer, whatever its limit."""
    if dialect_name != "postgresql":
        return chosen
    locked = chosen.with_for_update(skip_locked=True, of=table).cte("taken")
    return sa.select(locked.prefix_with("MATERIALIZED").c.id)


def take_unsent(
    dialect_name: str,
    table: sa.Table,
    *,
    moved_at: ColumnElement[Any],
    unsent: ColumnElement[bool],
    again: ColumnElement[bool],
    older_than: float,
    limit: int,
    pipelines: Sequence[str],
    item: ColumnElement[str] | None = None,
) -> sa.Update:
    """Take rows of `table` (timers or signals) that moved their job (of `pipelines`) on at
    `moved_at` more than `older_than` seconds ago and are still `unsent` (the mover died
    between its commit and the publish), marking them sent; returns each row's `id`, `job_id`,
    the `step` it moved the job from, and `again`: whether that step itself is sent again (a
    retry timer) rather than the one after it, and `item_id`: the map item to send again (a
    limit timer's), else empty."""
    chosen = (
        sa.select(table.c.id)
        .join(jobs, jobs.c.id == table.c.job_id)
        .where(
            unsent,
            moved_at < db.utcnow_plus(db.seconds(-older_than)),
            jobs.c.pipeline.in_(list(pipelines)),
        )
        .order_by(moved_at)
        .limit(limit)
    )
    return (
        sa.update(table)
        .where(table.c.id.in_(taken(dialect_name, chosen, table)), table.c.dispatched_at.is_(None))
        .values(dispatched_at=db.utcnow())
        .returning(
            table.c.id,
            table.c.job_id,
            table.c.step,
            again.label("again"),
            (item if item is not None else sa.literal("")).label("item_id"),
        )
    )


def undo_sent(table: sa.Table, row_ids: Sequence[int]) -> sa.Update:
    """Put rows back in the outbox: the publish after them failed after all."""
    return sa.update(table).where(table.c.id.in_(list(row_ids))).values(dispatched_at=None)
