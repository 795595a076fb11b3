"""`find_jobs`: jobs as people look for them (`oncelery jobs`). Read-only. Must not import
celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.engine import Engine

from ledger import db
from ledger.queries.job_search import select_found_jobs
from ledger.store import job_from_row
from ledger.types import Job, JobState


def find_jobs(
    engine: Engine,
    *,
    states: Sequence[JobState] | None = None,
    pipeline: str | None = None,
    event_id: str | None = None,
    order_id: str | None = None,
    limit: int = 50,
) -> list[Job]:
    """Jobs in `states` (every state if None), optionally of one pipeline, event id or order
    id, the most recently changed first, at most `limit` (see `select_found_jobs`)."""
    query = select_found_jobs(
        list(JobState) if states is None else states,
        limit,
        pipeline=pipeline,
        event_id=event_id,
        order_id=order_id,
    )
    with db.single_statement(engine) as conn:
        return [job_from_row(row) for row in conn.execute(query).mappings()]
