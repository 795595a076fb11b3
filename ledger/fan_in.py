"""A map step's fan-in, inside the caller's transaction: items written in batches, an
item's first transition out of pending, the counters moved by one conditional statement, and
the join handed on by the transaction that settles the last item. Must not import celery,
kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from uuid import UUID

from sqlalchemy.engine import Connection, RowMapping

from ledger import queries
from ledger.dead_letters import DeadLetterNote, write_item_dead_letter
from ledger.map_types import ItemClaim, ItemRecorded, MapCounters, NewItem
from ledger.outcomes import Failure
from ledger.types import DeadLetterReason, EventKind, ItemState, JobState

#: Items per INSERT when a map's items are written.
INSERT_BATCH: Final = 1000


def insert_items(
    conn: Connection,
    job_id: UUID,
    step: str,
    items: Sequence[NewItem],
    *,
    parent: tuple[str, str] | None,
) -> list[str]:
    """Write items (children of `parent`, an (item id, path), if given), one INSERT per
    batch; the ids of those the map did not have."""
    prefix = f"{parent[1]}." if parent is not None else ""
    rows = [
        {
            "job_id": job_id,
            "step": step,
            "item_id": each.item_id,
            "path": f"{prefix}{index:08d}",
            "key": each.key,
            "fingerprint": each.fingerprint,
            "item": each.item,
            "parent": parent[0] if parent is not None else None,
        }
        for index, each in enumerate(items)
    ]
    added: list[str] = []
    for start in range(0, len(rows), INSERT_BATCH):
        batch = rows[start : start + INSERT_BATCH]
        added.extend(conn.execute(queries.insert_items(conn.dialect.name, batch)).scalars())
    return added


def settle(
    conn: Connection,
    claim: ItemClaim,
    state: ItemState,
    children: Sequence[NewItem],
    next_step: str | None,
    settles: bool,
) -> ItemRecorded:
    """The fan-in: the item's first transition out of pending (else nothing more), its
    children written, the counters moved by one conditional statement, and the join
    handed on by the transaction that settles the last item."""
    job_id, step = claim.job_id, claim.step
    moved = queries.settle_item(job_id, step, claim.item_id, state, len(children))
    row = conn.execute(moved).one_or_none()
    if row is None:
        return ItemRecorded(claim.key, counted=False)
    added = insert_items(conn, job_id, step, children, parent=(claim.item_id, row.path))
    done = state is ItemState.DONE
    counters = count(
        conn,
        job_id,
        step,
        total=len(added),
        done=int(done),
        failed=int(not done),
        expanded=int(bool(added)),
        remaining=len(added) - int(done or settles),
    )
    joined = None
    if counters.remaining == 0 and not counters.joined:
        joined = join(conn, job_id, step, next_step)
    return ItemRecorded(claim.key, counted=True, children=added, joined=joined)


def count(conn: Connection, job_id: UUID, step: str, **moves: int) -> MapCounters:
    given = {"total": 0, "done": 0, "failed": 0, "expanded": 0, "remaining": 0}
    given.update(moves)
    if "remaining" not in moves:
        given["remaining"] = given["total"]
    row = conn.execute(queries.count_items(job_id, step, **given)).mappings().one()
    return counters_of(step, row)


def join(conn: Connection, job_id: UUID, step: str, next_step: str | None) -> JobState | None:
    """Mark the map joined and move its job on, if no other transaction did: the job's
    state then (None: joined before, or the job is no longer active)."""
    row = conn.execute(queries.join_map(job_id, step)).mappings().one_or_none()
    if row is None:
        return None
    summary = counters_of(step, row).summary()
    moved = queries.move_job_past_map(job_id, step, summary, next_step)
    state = conn.execute(moved).scalar_one_or_none()
    conn.execute(queries.append_event(job_id, step, EventKind.JOINED, detail=summary))
    return JobState(state) if state is not None else None


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


def counters_of(step: str, row: RowMapping) -> MapCounters:
    return MapCounters(
        step=step,
        policy=row["policy"],
        total=row["total"],
        done=row["done"],
        failed=row["failed"],
        expanded=row["expanded"],
        remaining=row["remaining"],
        joined=row["joined_at"] is not None,
    )
