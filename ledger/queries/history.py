"""The append-only step history: adding events, alone or inside a protocol statement, and
reading them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import FromClause

from ledger import db
from ledger.queries.common import ANY_ID, json_value, param
from ledger.queries.maps import not_an_item_key
from ledger.schema import JSONDocument, step_events
from ledger.types import JSON, EventKind


def append_event_after(after: FromClause, kind: EventKind) -> sa.Insert:
    """Append a history event of job `p_job_id` (`p_duration_ms`, `p_detail`) for the entry
    `after` yields (nothing if it yields no row). A part of the record."""
    source = sa.select(
        param("job_id", ANY_ID, sa.Uuid()),
        after.c.step,
        after.c.key,
        after.c.attempts,
        sa.literal(str(kind)),
        db.utcnow(),
        param("duration_ms", 0.0, sa.Float()),
        param("detail", {}, JSONDocument),
    ).select_from(after)
    columns = ["job_id", "step", "key", "attempt", "kind", "at", "duration_ms", "detail"]
    return sa.insert(step_events).from_select(columns, source).returning(step_events.c.id)


def append_event(
    job_id: UUID,
    step: str,
    kind: EventKind,
    *,
    key: str | None = None,
    attempt: int | None = None,
    duration_ms: float | None = None,
    detail: JSON = None,
) -> sa.Insert:
    """Append one history event."""
    return sa.insert(step_events).values(
        job_id=job_id,
        step=step,
        key=key,
        attempt=attempt,
        kind=str(kind),
        at=db.utcnow(),
        duration_ms=duration_ms,
        detail=json_value(detail) if detail is not None else sa.null(),
    )


def append_event_once(
    job_id: UUID, step: str, kind: EventKind, *, key: str | None, delivery: UUID
) -> sa.Insert:
    """Append one history event on behalf of one delivery (`detail.delivery`), unless that
    delivery's is there already: a retry after a commit whose answer was lost adds nothing."""
    events = step_events.c
    written = sa.exists().where(
        events.job_id == job_id,
        events.kind == str(kind),
        events.detail["delivery"].as_string() == str(delivery),
    )
    source = sa.select(
        sa.literal(job_id, sa.Uuid()),
        sa.literal(step),
        sa.literal(key, sa.String()),
        sa.literal(str(kind)),
        db.utcnow(),
        json_value({"delivery": str(delivery)}),
    ).where(~written)
    columns = ["job_id", "step", "key", "kind", "at", "detail"]
    return sa.insert(step_events).from_select(columns, source)


def append_events(
    jobs_and_steps: Sequence[tuple[UUID, str]], kind: EventKind, detail: JSON
) -> sa.Insert:
    """Append the same event to several jobs' histories at once."""
    rows = [
        {
            "job_id": job_id,
            "step": step,
            "key": None,
            "attempt": None,
            "kind": str(kind),
            "at": db.utcnow(),
            "duration_ms": None,
            "detail": detail,
        }
        for job_id, step in jobs_and_steps
    ]
    return sa.insert(step_events).values(rows)


def select_events(job_id: UUID) -> sa.Select[Any]:
    """A job's history, oldest first, but for its map steps' items' own events (dead letters:
    the map's counters sum them up, `dlq list` lists them)."""
    key = step_events.c.key
    return (
        sa.select(step_events)
        .where(step_events.c.job_id == job_id, sa.or_(key.is_(None), not_an_item_key(job_id, key)))
        .order_by(step_events.c.id)
    )


def count_events(kind: EventKind, job_ids: Sequence[UUID] | None = None) -> sa.Select[Any]:
    """How many events of a kind were appended, optionally for some jobs only."""
    query = sa.select(sa.func.count()).where(step_events.c.kind == str(kind))
    if job_ids is not None:
        query = query.where(step_events.c.job_id.in_(job_ids))
    return query
