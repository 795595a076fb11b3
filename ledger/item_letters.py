"""What a person's decision does to a map step's item whose dead letter it is — replayed
(pending again), resolved as succeeded (done), purged (refused while the map waits for it) —
each decided under the map's row lock, never after its join. Must not import celery, kombu,
jobs or config."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy.engine import Connection, RowMapping

from ledger import map_counters, queries
from ledger.types import ACTIVE_JOB_STATES, JSON, ItemState, JobState


class Refusal(Exception):
    """Rolls a dead letter's transaction back, leaving it open."""


def item_of(conn: Connection, job_id: UUID, step: str, key: str | None) -> RowMapping | None:
    """The item of a map step a dead letter's key is (None: a step's dead letter)."""
    if key is None:
        return None
    found = conn.execute(queries.select_item_by_key(job_id, step, key))
    return found.mappings().one_or_none()


def _lock_unjoined(conn: Connection, job_id: UUID, step: str) -> None:
    """Take the map's row lock, the one its counters move under: a record settling its last
    item meanwhile joins first (the caller is refused) or waits for the caller."""
    if conn.execute(queries.lock_unjoined_map(job_id, step)).one_or_none() is None:
        raise Refusal("its map was joined already (the join read the item as it was)")


def _failed_item(conn: Connection, job_id: UUID, step: str, key: str) -> tuple[str, ItemState]:
    """The item's id and state, read under the map's lock: failed (settled) or waiting, its
    key its own (not first used for another request, whose entry must stay as it is)."""
    item = conn.execute(queries.select_item_by_key(job_id, step, key)).mappings().one()
    state = ItemState(item["state"])
    if state not in (ItemState.FAILED, ItemState.WAITING):
        raise Refusal(f"its item is {state}, not failed")
    entry = conn.execute(queries.select_entry(key)).mappings().one_or_none()
    if entry is not None and (entry["step"], entry["fingerprint"]) != (step, item["fingerprint"]):
        raise Refusal("its item's key was first used for another request: fix the key")
    return str(item["item_id"]), state


def reopen(conn: Connection, job_id: UUID, step: str, key: str) -> str:
    """A replay: make the item pending again and count it back as unsettled (`failed-1`, and
    `waiting-1` or `remaining+1`); its item id."""
    _lock_unjoined(conn, job_id, step)
    item_id, state = _failed_item(conn, job_id, step, key)
    if conn.execute(queries.reopen_item(job_id, step, key, state)).one_or_none() is None:
        raise Refusal("its item changed meanwhile")
    waited = state is ItemState.WAITING
    map_counters.count(
        conn, job_id, step, failed=-1, waiting=-int(waited), remaining=int(not waited)
    )
    return item_id


def resolve_done(
    conn: Connection, job_id: UUID, step: str, key: str, result: JSON, next_step: str | None
) -> tuple[str, JobState, bool]:
    """A person's word that the item did take effect: its key succeeded with `result`, the
    item done (`done+1`, `failed-1`; a waiting one also `waiting-1`, `remaining-1`), the map
    joined if that settled it. Its item id, the job's state, and whether this joined the
    map (the job moved on: the join is the caller's to send)."""
    _lock_unjoined(conn, job_id, step)
    job = conn.execute(queries.select_job(job_id)).mappings().one()
    if JobState(job["state"]) not in ACTIVE_JOB_STATES:
        raise Refusal(f"its job is {job['state']}")
    item_id, state = _failed_item(conn, job_id, step, key)
    if conn.execute(queries.settle_entry(key, result, job_id)).one_or_none() is None:
        raise Refusal("its item's key is not failed or unknown")
    if conn.execute(queries.resolve_item(job_id, step, key, state)).one_or_none() is None:
        raise Refusal("its item changed meanwhile")
    waited = int(state is ItemState.WAITING)
    counters = map_counters.count(
        conn, job_id, step, done=1, failed=-1, waiting=-waited, remaining=-waited
    )
    joined = None
    if counters.remaining == 0:
        joined = map_counters.join(conn, job_id, step, next_step)
    if joined is not None:
        return item_id, joined, True
    return item_id, JobState(job["state"]), False


def purge_refusal(conn: Connection, job_id: UUID, item: RowMapping) -> str | None:
    """Why an item's open letter may not be purged (None: it may; its job is left as it is):
    an active job's map waits for the item, and deleting the letter would leave the map
    waiting for ever with nothing to act on."""
    if ItemState(item["state"]) is not ItemState.WAITING:
        return None
    job = conn.execute(queries.select_job(job_id)).mappings().one()
    if JobState(job["state"]) not in ACTIVE_JOB_STATES:
        return None
    return (
        f"its item {item['item_id']!r} waits for a person (the map cannot join without it): "
        "replay it, resolve it --as succeeded, or cancel the job"
    )
