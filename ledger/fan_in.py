"""A map step's fan-in, inside the caller's transaction: items written in batches, an
item's first transition out of pending, the counters moved by one conditional statement, and
the join handed on by the transaction that settles the last item. Must not import celery,
kombu, jobs or config."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final
from uuid import UUID

from sqlalchemy.engine import Connection

from ledger import queries
from ledger.dead_letters import DeadLetterNote, write_item_dead_letter
from ledger.errors import ItemConflict
from ledger.map_counters import count, join
from ledger.map_types import ItemClaim, ItemRecorded, MapCounters, NewItem
from ledger.outcomes import Failure
from ledger.types import DeadLetterReason, ItemState

#: Items per INSERT when a map's items are written.
INSERT_BATCH: Final = 1000


def insert_items(
    conn: Connection,
    job_id: UUID,
    step: str,
    items: Sequence[tuple[tuple[str, str] | None, Iterable[NewItem]]],
) -> dict[str | None, list[str]]:
    """Write items, each group the children of a parent (an (item id, path)) or the roots
    (None), one INSERT per `INSERT_BATCH` rows; the ids the map did not have, by parent. An
    id the map has (or this call wrote) with the same fingerprint is that item, counted once.

    Raises:
        ItemConflict: an id the map has with another fingerprint (roll the caller back).
    """
    added: dict[str | None, list[str]] = {}
    for item_id, parent in _inserted(conn, job_id, step, items):
        added.setdefault(parent, []).append(item_id)
    return added


def insert_roots(conn: Connection, job_id: UUID, step: str, items: Iterable[NewItem]) -> int:
    """`insert_items` for a map's first items, read as they come (a stream of 100,000 is
    never in memory at once): how many the map did not have."""
    return sum(1 for _ in _inserted(conn, job_id, step, [(None, items)]))


def _inserted(
    conn: Connection,
    job_id: UUID,
    step: str,
    items: Sequence[tuple[tuple[str, str] | None, Iterable[NewItem]]],
) -> Iterator[tuple[str, str | None]]:
    # Rows built a batch at a time: for 100,000 items, all of them at once were 34 MB more.
    rows = (
        {
            "job_id": job_id,
            "step": step,
            "item_id": each.item_id,
            "path": f"{parent[1]}.{index:08d}" if parent is not None else f"{index:08d}",
            "key": each.key,
            "fingerprint": each.fingerprint,
            "item": each.item,
            "parent": parent[0] if parent is not None else None,
        }
        for parent, group in items
        for index, each in enumerate(group)
    )
    while batch := list(itertools.islice(rows, INSERT_BATCH)):
        inserted = conn.execute(queries.insert_items(conn.dialect.name), batch).all()
        for item_id, parent in inserted:
            yield str(item_id), str(parent) if parent is not None else None
        if len(inserted) < len(batch):
            _same_items(conn, job_id, step, batch, {str(item_id) for item_id, _ in inserted})


def _same_items(
    conn: Connection,
    job_id: UUID,
    step: str,
    batch: Sequence[dict[str, Any]],
    inserted: set[str],
) -> None:
    """Each row of `batch` the INSERT left out (its id taken, before or by an earlier row)
    must be the item under that id: the same fingerprint; else raise `ItemConflict` (the
    statement dropped it without a word)."""
    given = Counter(str(row["item_id"]) for row in batch)
    taken = {
        row["key"] for row in batch if given[row["item_id"]] > 1 or row["item_id"] not in inserted
    }
    found = conn.execute(queries.select_item_fingerprints(job_id, step, sorted(taken)))
    stored = {str(item_id): str(fingerprint) for item_id, fingerprint in found}
    for row in batch:
        if stored.get(row["item_id"], row["fingerprint"]) != row["fingerprint"]:
            raise ItemConflict(str(row["item_id"]), step)


def settle(
    conn: Connection,
    claims: Sequence[tuple[ItemClaim, Sequence[NewItem]]],
    state: ItemState,
    next_step: str | None,
    max_failed: int | None = None,
) -> dict[str, ItemRecorded]:
    """The fan-in, for items of one job's map: their first transition out of pending (one
    UPDATE; an item already settled counts nothing more), their children written (one
    INSERT), the counters moved by one conditional statement, and the join handed on by the
    transaction that settles the last item. A failed item settles while the map's settled
    failures stay within `max_failed` (None: any number); past it, it waits for a person.
    By item id, what each record did."""
    if not claims:
        return {}
    job_id, step = claims[0][0].job_id, claims[0][0].step
    by_id = {claim.item_id: (claim, children) for claim, children in claims}
    keys = [claim.key for claim, _ in claims]
    moved = conn.execute(queries.settle_items(state), _settle_params(job_id, step, keys))
    paths: dict[str, str] = {str(item_id): str(path) for item_id, path in moved}
    recorded = {
        item_id: ItemRecorded(claim.key, counted=False)
        for item_id, (claim, _) in by_id.items()
        if item_id not in paths
    }
    if not paths:
        return recorded
    parents = [((item_id, paths[item_id]), by_id[item_id][1]) for item_id in paths]
    added = insert_items(conn, job_id, step, [(p, kids) for p, kids in parents if kids])
    for item_id, kids in added.items():
        conn.execute(queries.note_children(job_id, step, str(item_id), len(kids)))
    if state is ItemState.DONE:
        new = sum(len(kids) for kids in added.values())
        counters = count(
            conn,
            job_id,
            step,
            total=new,
            done=len(paths),
            expanded=len(added),
            remaining=new - len(paths),
        )
    else:
        for item_id in paths:
            counters = _count_failed(conn, job_id, step, item_id, max_failed)
    joined = None
    if counters.remaining == 0 and not counters.joined:
        joined = join(conn, job_id, step, next_step)
    for item_id in paths:
        claim = by_id[item_id][0]
        recorded[item_id] = ItemRecorded(claim.key, counted=True, children=added.get(item_id, []))
    if joined is not None:
        # One record hands the join on: the last of the lot.
        last = list(paths)[-1]
        recorded[last] = dataclasses.replace(recorded[last], joined=joined)
    return recorded


def _count_failed(
    conn: Connection, job_id: UUID, step: str, item_id: str, max_failed: int | None
) -> MapCounters:
    """Count a failed item, settled if the map's settled failures stay within `max_failed`
    (the `maps` row, locked by the first statement, decides for concurrent failures too)."""
    counters = count(conn, job_id, step, failed=1)
    settled_before = counters.failed - 1 - counters.waiting
    if max_failed is None or settled_before < max_failed:
        return count(conn, job_id, step, remaining=-1)
    conn.execute(queries.wait_item(job_id, step, item_id))
    return count(conn, job_id, step, waiting=1)


def _settle_params(job_id: UUID, step: str, keys: list[str]) -> dict[str, Any]:
    return {"p_job_id": job_id, "p_step": step, "p_keys": keys}


def dead_letter(
    conn: Connection, claim: ItemClaim, failure: Failure, attempts: int, first: Any
) -> None:
    letter = DeadLetterNote(
        claim.job_id,
        claim.step,
        claim.key,
        failure.error,
        failure.reason or DeadLetterReason.PERMANENT,
        failure.duration_ms,
    )
    write_item_dead_letter(conn, letter, attempts, first, (claim.item_id, claim.item))
