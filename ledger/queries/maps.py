"""A map step's statements: its items written in batches (one INSERT each), an item's key
claimed like a step's, its first transition to done or failed, the fan-in counters, the
join's hand-on, the items read in item order, and the sweeper's take of lost items."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger import db
from ledger.queries.claims import claim_key_from, entry_columns
from ledger.queries.common import ACTIVE, ANY_ID, json_value, param
from ledger.schema import jobs, ledger_entries, map_items, maps
from ledger.types import JSON, ItemState


def insert_map(dialect_name: str, job_id: UUID, step: str, policy: str) -> Any:
    """A map's counters, all at zero (nothing if the job's map at `step` exists)."""
    insert = db.insert_for(dialect_name)
    return (
        insert(maps)
        .values(
            job_id=job_id,
            step=step,
            policy=policy,
            total=0,
            done=0,
            failed=0,
            waiting=0,
            expanded=0,
            remaining=0,
            created_at=db.utcnow(),
            updated_at=db.utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[maps.c.job_id, maps.c.step])
    )


@functools.cache
def insert_items(dialect_name: str) -> Any:
    """Items as one INSERT, executed with a list of rows (each row's `job_id`, `step`,
    `item_id`, `path`, `key`, `fingerprint`, `item`, `parent`): SQLAlchemy sends them as
    multi-row VALUES pages of a statement compiled once (a statement with the rows inside
    took 0.3 ms a row to compile: 3.7 s for 10,000 items, against 0.9 s). An item id the map
    has already is left as it is. Returns the (item id, parent) of those inserted."""
    insert = db.insert_for(dialect_name)
    item = map_items.c
    return (
        insert(map_items)
        .values(
            state=str(ItemState.PENDING),
            children=0,
            created_at=db.utcnow(),
            updated_at=db.utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[item.job_id, item.step, item.item_id])
        .returning(item.item_id, item.parent)
    )


def select_item_fingerprints(job_id: UUID, step: str, keys: Sequence[str]) -> sa.Select[Any]:
    """The (item id, fingerprint) of these items of a map, by key (see `checked`)."""
    item = map_items.c
    return sa.select(item.item_id, item.fingerprint).where(*_the_keys(job_id, step, list(keys)))


def _the_item(job_id: Any, step: Any, item_ids: Any) -> list[ColumnElement[bool]]:
    item = map_items.c
    where = [item.job_id == job_id, item.step == step]
    if isinstance(item_ids, list):
        where.append(item.item_id.in_(item_ids))
    else:
        where.append(item.item_id == item_ids)
    return where


def checked(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """A condition Postgres checks on the rows found but never looks rows up by.

    Statements on several items find them by key alone (`ix_map_items_key`). Given
    `job_id = …` (or `state = …`) as an index condition, the planner takes the map's
    (job, step, path) index — or the state index — whenever its statistics make the map
    look small (a new map among many small ones: it cannot know better), and then reads the
    whole map for every message of 20 items: quadratic in the map's size (seen: 9,980 rows
    read per message of a 10,000-item map). `IS TRUE` is never an index condition."""
    return condition.is_(sa.true())


def _the_keys(job_id: Any, step: Any, keys: Any) -> list[ColumnElement[bool]]:
    """Items of a job's map by their keys (see `checked`)."""
    item = map_items.c
    return [item.key.in_(keys), checked(item.job_id == job_id), item.step == step]


def select_step_key(job_id: UUID, step: str) -> sa.Select[Any]:
    """The key of a job's step (its map step's items' keys are this, "/", their id)."""
    return sa.select(jobs.c.step_keys[step].as_string()).where(jobs.c.id == job_id)


def mark_items_dispatched(job_id: UUID, step: str, keys: Sequence[str]) -> sa.Update:
    """Take items (by key) out of the outbox: their messages are with the broker."""
    return (
        sa.update(map_items)
        .where(*_the_keys(job_id, step, list(keys)))
        .values(dispatched_at=db.utcnow(), updated_at=db.utcnow())
    )


def select_outbox_page(job_id: UUID, step: str, after: str, limit: int) -> sa.Select[Any]:
    """Up to `limit` (item id, path) of a map's items in the outbox, in item order after the
    path `after`: read on the map's (job, step, path) index. The outbox's conditions are
    `checked`, never index conditions: the outbox's index holds every map's unsent items."""
    item = map_items.c
    return (
        sa.select(item.item_id, item.path)
        .where(
            item.job_id == job_id,
            item.step == step,
            item.path > after,
            checked(item.state == str(ItemState.PENDING)),
            checked(item.dispatched_at.is_(None)),
        )
        .order_by(item.path)
        .limit(limit)
    )


def touch_outbox(job_id: UUID, step: str) -> sa.Update:
    """Mark a map's pending items in the outbox touched (being published)."""
    item = map_items.c
    return (
        sa.update(map_items)
        .where(
            item.job_id == job_id,
            item.step == step,
            item.state == str(ItemState.PENDING),
            item.dispatched_at.is_(None),
        )
        .values(updated_at=db.utcnow())
    )


@functools.cache
def claim_items(dialect_name: str, takeover_expired: bool) -> Any:
    """Claim the keys of pending items (`p_job_id`, `p_step`, `p_keys`) for `p_owner`, as
    a step's key is claimed (the same statement: inserted as started, or taken over from a
    failed or expired attempt), if their job is active, in one statement; returns
    (`attempts`, `key`) of each key that is now ours."""
    item = map_items.c
    job_id = param("job_id", ANY_ID, sa.Uuid())
    # Not correlated on `map_items.job_id`: Postgres would turn it into a join looking the
    # map's items up by job (see `checked`).
    active_job = sa.exists().where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE))
    source = sa.select(item.key, item.job_id, item.fingerprint).where(
        *_the_keys(job_id, param("step", "", sa.String()), sa.bindparam("p_keys", expanding=True)),
        checked(item.state == str(ItemState.PENDING)),
        active_job,
    )
    claim = claim_key_from(db.insert_for(dialect_name), source, takeover_expired)
    return claim.returning(ledger_entries.c.key)


def select_items_for_claim(job_id: UUID, step: str, keys: Sequence[str]) -> sa.Select[Any]:
    """What items' claim (by key) needs and found: each item, its job, its key's entry."""
    item = map_items.c
    entry = ledger_entries.alias("entry")
    return (
        sa.select(
            item.item_id,
            item.key,
            item.item,
            item.state.label("item_state"),
            item.fingerprint,
            jobs.c.state.label("job_state"),
            jobs.c.current_step,
            jobs.c.context,
            jobs.c.results,
            *entry_columns(entry),
        )
        .select_from(
            map_items.join(jobs, jobs.c.id == item.job_id).outerjoin(entry, entry.c.key == item.key)
        )
        .where(*_the_keys(job_id, step, list(keys)))
    )


@functools.cache
def settle_items(state: ItemState) -> sa.Update:
    """Items' first transition out of pending (to done or failed; `p_job_id`, `p_step`,
    `p_keys`); returns (item id, path) of those that made it now, and only those, so a
    redelivered or re-driven item never counts twice."""
    item = map_items.c
    return (
        sa.update(map_items)
        .where(
            *_the_keys(
                param("job_id", ANY_ID, sa.Uuid()),
                param("step", "", sa.String()),
                sa.bindparam("p_keys", expanding=True),
            ),
            checked(item.state == str(ItemState.PENDING)),
        )
        .values(state=str(state), updated_at=db.utcnow())
        .returning(item.item_id, item.path)
    )


def note_children(job_id: UUID, step: str, item_id: str, children: int) -> sa.Update:
    """How many new items an item expanded into."""
    return sa.update(map_items).where(*_the_item(job_id, step, item_id)).values(children=children)


def wait_item(job_id: UUID, step: str, item_id: str) -> sa.Update:
    """A failed item its map's policy does not settle: it waits for a person."""
    return (
        sa.update(map_items)
        .where(
            *_the_item(job_id, step, item_id), checked(map_items.c.state == str(ItemState.FAILED))
        )
        .values(state=str(ItemState.WAITING))
    )


def reopen_item(job_id: UUID, step: str, key: str, state: ItemState) -> sa.Update:
    """An item failed (settled, or waiting) back to pending, if still in `state` (a replay of
    its dead letter); returns it then."""
    item = map_items.c
    return (
        sa.update(map_items)
        .where(*_the_keys(job_id, step, [key]), checked(item.state == str(state)))
        # Back in the outbox: its sender marks it dispatched, or the sweeper sends it.
        .values(state=str(ItemState.PENDING), updated_at=db.utcnow(), dispatched_at=None)
        .returning(item.item_id)
    )


def resolve_item(job_id: UUID, step: str, key: str, state: ItemState) -> sa.Update:
    """An item failed (settled, or waiting) to done, if still in `state` (a person's word
    that it did take effect); returns it then."""
    item = map_items.c
    return (
        sa.update(map_items)
        .where(*_the_keys(job_id, step, [key]), checked(item.state == str(state)))
        .values(state=str(ItemState.DONE), updated_at=db.utcnow())
        .returning(item.item_id)
    )


def touch_item(job_id: UUID, step: str, item_id: str) -> sa.Update:
    """Mark an item touched (a failed attempt, retried later: not stalled)."""
    return (
        sa.update(map_items).where(*_the_item(job_id, step, item_id)).values(updated_at=db.utcnow())
    )


def select_item_by_key(job_id: UUID, step: str, key: str) -> sa.Select[Any]:
    """An item of a job's map, by its key."""
    return sa.select(map_items).where(*_the_keys(job_id, step, [key]))


def count_items(
    job_id: UUID,
    step: str,
    *,
    total: int = 0,
    done: int = 0,
    failed: int = 0,
    waiting: int = 0,
    expanded: int = 0,
    remaining: int = 0,
) -> sa.Update:
    """Move a map's counters (the fan-in); returns them as they now stand."""
    counters = maps.c
    return (
        sa.update(maps)
        .where(counters.job_id == job_id, counters.step == step)
        .values(
            total=counters.total + total,
            done=counters.done + done,
            failed=counters.failed + failed,
            waiting=counters.waiting + waiting,
            expanded=counters.expanded + expanded,
            remaining=counters.remaining + remaining,
            updated_at=db.utcnow(),
        )
        .returning(*_counter_columns())
    )


def lock_unjoined_map(job_id: UUID, step: str) -> sa.Update:
    """Lock a map's row if it is not joined yet (a person's change to one of its items is
    decided under the lock the counters are moved under); returns its counters then."""
    counters = maps.c
    return (
        sa.update(maps)
        .where(counters.job_id == job_id, counters.step == step, counters.joined_at.is_(None))
        .values(updated_at=db.utcnow())
        .returning(*_counter_columns())
    )


def _counter_columns() -> list[ColumnElement[Any]]:
    c = maps.c
    return [c.policy, c.total, c.done, c.failed, c.waiting, c.expanded, c.remaining, c.joined_at]


def join_map(job_id: UUID, step: str) -> sa.Update:
    """Mark a map joined, once: only the transaction that finds it settled and not joined
    gets a row back, and hands the job on to the join."""
    counters = maps.c
    return (
        sa.update(maps)
        .where(
            counters.job_id == job_id,
            counters.step == step,
            counters.remaining == 0,
            counters.joined_at.is_(None),
        )
        .values(joined_at=db.utcnow(), updated_at=db.utcnow())
        .returning(*_counter_columns())
    )


def note_fan_out(job_id: UUID, step: str, result: JSON) -> sa.Update:
    """Give a job its map step's own result (how many items it produced) while its items
    run, so that a redelivered message of the step knows the key as this job's."""
    return (
        sa.update(jobs)
        .where(jobs.c.id == job_id)
        .values(
            results=db.json_set_key(jobs.c.results, sa.literal(step), json_value(result)),
            updated_at=db.utcnow(),
        )
    )


def select_map_counters(job_id: UUID, step: str | None = None) -> sa.Select[Any]:
    """A job's maps' counters (of one step, if given)."""
    query = sa.select(maps.c.step, *_counter_columns()).where(maps.c.job_id == job_id)
    return query if step is None else query.where(maps.c.step == step)


def select_items_page(job_id: UUID, step: str, after: str | None, limit: int) -> sa.Select[Any]:
    """A page of a map's items in item order, after the path `after`, each with its key's
    result or error (keyset paging: each page one index range scan) — if its key is the
    item's: one first used for another request (a fingerprint mismatch) gives none."""
    item = map_items.c
    entry = ledger_entries.c
    its_entry = sa.and_(
        entry.key == item.key, entry.step == item.step, entry.fingerprint == item.fingerprint
    )
    query = (
        sa.select(
            item.item_id,
            item.item,
            item.state,
            item.path,
            item.children,
            ledger_entries.c.result,
            ledger_entries.c.error,
        )
        .select_from(map_items.outerjoin(ledger_entries, its_entry))
        .where(item.job_id == job_id, item.step == step)
        .order_by(item.path)
        .limit(limit)
    )
    return query if after is None else query.where(item.path > after)


def count_recent_items(window: float) -> sa.Select[Any]:
    """How many items were done in the last `window` seconds (the `(state, updated_at)`
    index answers it)."""
    item = map_items.c
    return sa.select(sa.func.count()).where(
        item.state == str(ItemState.DONE),
        item.updated_at > db.utcnow_plus(db.seconds(-window)),
    )


def select_item_keys(keys: Sequence[str]) -> sa.Select[Any]:
    """Which of these keys are items'."""
    return sa.select(map_items.c.key).where(map_items.c.key.in_(list(keys))).distinct()


def not_an_item_key(job_id: UUID, key: ColumnElement[Any]) -> ColumnElement[bool]:
    """The key is not one of the job's items' (history lists steps, and sums items up)."""
    item = map_items.c
    return ~sa.exists().where(item.job_id == job_id, item.key == key)


def select_items_to_prune(job_ids: Sequence[UUID], limit: int) -> sa.Select[Any]:
    """Up to `limit` keys of the items of jobs being pruned."""
    return sa.select(map_items.c.key).where(map_items.c.job_id.in_(list(job_ids))).limit(limit)


def delete_items(job_ids: Sequence[UUID], keys: Sequence[str]) -> list[sa.Delete]:
    """Delete items of jobs being pruned, by key, and their keys' entries held by those
    jobs."""
    entry, item = ledger_entries.c, map_items.c
    owned = list(job_ids)
    return [
        sa.delete(ledger_entries).where(entry.key.in_(list(keys)), entry.job_id.in_(owned)),
        sa.delete(map_items).where(item.key.in_(list(keys)), item.job_id.in_(owned)),
    ]
