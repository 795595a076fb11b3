"""A map's counters (its `maps` row): moved by one conditional statement each, and the join
marked once, by the transaction that finds nothing left, moving the job on. Must not import
celery, kombu, jobs or config."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy.engine import Connection, RowMapping

from ledger import queries
from ledger.map_types import MapCounters
from ledger.types import EventKind, JobState


def count(conn: Connection, job_id: UUID, step: str, **moves: int) -> MapCounters:
    """Move a map's counters by `moves`; they as they now stand."""
    row = conn.execute(queries.count_items(job_id, step, **moves)).mappings().one()
    return counters_of(step, row)


def join(conn: Connection, job_id: UUID, step: str, next_step: str | None) -> JobState | None:
    """Mark the map joined and move its job on, if no other transaction did: the job's
    state then (None: joined before, or the job is no longer active)."""
    row = conn.execute(queries.join_map(job_id, step)).mappings().one_or_none()
    if row is None:
        return None
    summary = counters_of(step, row).summary()
    moved = queries.move_on_with_result(job_id, step, summary, next_step)
    state = conn.execute(moved).scalar_one_or_none()
    conn.execute(queries.append_event(job_id, step, EventKind.JOINED, detail=summary))
    return JobState(state) if state is not None else None


def counters_of(step: str, row: RowMapping) -> MapCounters:
    """A map's counters from a `maps` row (or a statement returning its counter columns)."""
    return MapCounters(
        step=step,
        policy=row["policy"],
        total=row["total"],
        done=row["done"],
        failed=row["failed"],
        waiting=row["waiting"],
        expanded=row["expanded"],
        remaining=row["remaining"],
        joined=row["joined_at"] is not None,
    )
