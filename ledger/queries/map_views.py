"""What people read of map steps (`status`, the metrics, the pages): the unjoined maps'
counters summed per pipeline and step, the joined maps counted, a page of one map's items.
Each reads the `maps` counters rows or one index range of `map_items`, never a whole map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from ledger.queries.common import ACTIVE
from ledger.schema import dead_letters, jobs, ledger_entries, map_items, maps
from ledger.types import ItemState


def sum_unjoined_maps() -> sa.Select[Any]:
    """Per pipeline and map step, the maps of active jobs not joined yet and their counters
    summed (one row per map read: the counters, not the items)."""
    c = maps.c
    return (
        sa.select(
            jobs.c.pipeline,
            c.step,
            sa.func.count().label("maps"),
            *(
                sa.func.coalesce(sa.func.sum(column), 0).label(column.name)
                for column in (c.total, c.done, c.failed, c.waiting, c.expanded)
            ),
        )
        .select_from(maps.join(jobs, jobs.c.id == c.job_id))
        .where(c.joined_at.is_(None), jobs.c.state.in_(ACTIVE))
        .group_by(jobs.c.pipeline, c.step)
        .order_by(jobs.c.pipeline, c.step)
    )


def count_joined_maps() -> sa.Select[Any]:
    """Per pipeline and map step, how many maps have joined."""
    c = maps.c
    return (
        sa.select(jobs.c.pipeline, c.step, sa.func.count().label("maps"))
        .select_from(maps.join(jobs, jobs.c.id == c.job_id))
        .where(c.joined_at.is_not(None))
        .group_by(jobs.c.pipeline, c.step)
        .order_by(jobs.c.pipeline, c.step)
    )


def select_map(job_id: UUID, step: str) -> sa.Select[Any]:
    """One job's map at `step`: its counters."""
    c = maps.c
    return sa.select(
        c.step,
        c.policy,
        c.total,
        c.done,
        c.failed,
        c.waiting,
        c.expanded,
        c.remaining,
        c.joined_at,
    ).where(c.job_id == job_id, c.step == step)


def select_item_rows(
    job_id: UUID, step: str, state: ItemState | None, after: str | None, limit: int
) -> sa.Select[Any]:
    """Up to `limit` items of a map in item order after the path `after` (keyset: one range
    of the `(job_id, step, path)` index), of one state if given, each with its key's entry."""
    item, entry = map_items.c, ledger_entries.c
    query = (
        sa.select(
            item.item_id,
            item.path,
            item.state,
            item.item,
            item.key,
            item.children,
            item.updated_at,
            entry.state.label("key_state"),
            entry.attempts,
            entry.result,
            entry.error,
        )
        .select_from(map_items.outerjoin(ledger_entries, entry.key == item.key))
        .where(item.job_id == job_id, item.step == step)
        .order_by(item.path)
        .limit(limit)
    )
    if state is not None:
        query = query.where(item.state == str(state))
    return query if after is None else query.where(item.path > after)


def walk_in_order() -> sa.TextClause:
    """Postgres, for the rest of the transaction: no Sort node, so a page of items walks the
    `(job_id, step, path)` index and stops at its limit. A new map among many small analysed
    ones looks to the planner like a map of five, cheaper read whole and sorted: 100,000
    rows for a page of 100 (the same holds, rarely, for a state the map has few of)."""
    return sa.text("SET LOCAL enable_sort = off")


def select_letters_of_keys(job_id: UUID, keys: Sequence[str]) -> sa.Select[Any]:
    """The dead letters of a job that name one of these keys (oldest first)."""
    letter = dead_letters.c
    return (
        sa.select(letter.id, letter.key, letter.state)
        .where(letter.job_id == job_id, letter.key.in_(list(keys)))
        .order_by(letter.id)
    )


def select_mismatched_maps() -> sa.Select[Any]:
    """Maps whose counters disagree with their items, or whose join disagrees with their
    counters and job (the audit's: one aggregate over every map's items, not a page's).

    Each row: the map's counters, its job's pipeline, state and step, and what its items
    say (`items`, `items_done`, `items_failed` (failed or waiting), `items_waiting`,
    `items_open` (pending or waiting), `items_expanded` (with children))."""
    item, c = map_items.c, maps.c
    state = item.state
    per_map = (
        sa.select(
            item.job_id,
            item.step,
            sa.func.count().label("items"),
            _count_where(state == ItemState.DONE.value, "items_done"),
            _count_where(state.in_(_FAILED_STATES), "items_failed"),
            _count_where(state == ItemState.WAITING.value, "items_waiting"),
            _count_where(state.in_(_OPEN_STATES), "items_open"),
            _count_where(item.children > 0, "items_expanded"),
        )
        .group_by(item.job_id, item.step)
        .subquery("per_map")
    )
    said = {name: sa.func.coalesce(per_map.c[name], 0) for name in _SAID}
    at_map = sa.and_(jobs.c.state.in_(ACTIVE), jobs.c.current_step == c.step)
    disagree = sa.or_(
        c.total != said["items"],
        c.done != said["items_done"],
        c.failed != said["items_failed"],
        c.waiting != said["items_waiting"],
        c.remaining != said["items_open"],
        c.expanded != said["items_expanded"],
        sa.and_(c.joined_at.is_not(None), sa.or_(c.remaining != 0, at_map)),
        sa.and_(c.joined_at.is_(None), c.remaining == 0, at_map),
    )
    return (
        sa.select(
            c.job_id,
            c.step,
            c.total,
            c.done,
            c.failed,
            c.waiting,
            c.remaining,
            c.expanded,
            c.joined_at,
            jobs.c.pipeline,
            jobs.c.state.label("job_state"),
            jobs.c.current_step,
            *(value.label(name) for name, value in said.items()),
        )
        .select_from(
            maps.join(jobs, jobs.c.id == c.job_id).outerjoin(
                per_map, sa.and_(per_map.c.job_id == c.job_id, per_map.c.step == c.step)
            )
        )
        .where(disagree)
        .order_by(c.job_id, c.step)
    )


_FAILED_STATES = (ItemState.FAILED.value, ItemState.WAITING.value)
_OPEN_STATES = (ItemState.PENDING.value, ItemState.WAITING.value)
_SAID = ("items", "items_done", "items_failed", "items_waiting", "items_open", "items_expanded")


def _count_where(condition: sa.ColumnElement[bool], name: str) -> sa.Label[Any]:
    # SUM of a CASE rather than COUNT(*) FILTER: the same on Postgres and SQLite.
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0).label(name)
