"""Finding jobs for people (`oncelery jobs`): by state, pipeline, event id or order id, the most
recently changed first, each statement walking an index rather than the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.expression import ColumnElement

from ledger.schema import jobs
from ledger.types import JobState


def select_found_jobs(
    states: Sequence[JobState],
    limit: int,
    *,
    pipeline: str | None = None,
    event_id: str | None = None,
    order_id: str | None = None,
) -> sa.Select[Any]:
    """Jobs in `states` (and of `pipeline`, for `event_id`, with `order_id` if given), the most
    recently changed first, at most `limit`.

    An event id is found through `(pipeline, event_id)`'s unique index: with no pipeline
    given, one seek per pipeline that has jobs (`_pipelines`). Otherwise each state is read
    from `ix_jobs_state_updated_at` backwards, stopping at `limit` rows, and the states
    merged: no sort of the whole table. An order id is a member of the job's context, which
    no index covers: its search reads each state's jobs, newest first, until `limit` match.
    """
    where: list[ColumnElement[bool]] = []
    if pipeline is not None:
        where.append(jobs.c.pipeline == pipeline)
    if order_id is not None:
        where.append(jobs.c.context["order_id"].as_string() == order_id)
    newest = (jobs.c.updated_at.desc(), jobs.c.id)
    if event_id is not None:
        if pipeline is None:
            where.append(jobs.c.pipeline.in_(sa.select(_pipelines().c.name)))
        where += [jobs.c.event_id == event_id, jobs.c.state.in_([str(s) for s in states])]
        return sa.select(jobs).where(*where).order_by(*newest).limit(limit)
    per_state = [
        sa.select(jobs)
        .where(jobs.c.state == str(state), *where)
        .order_by(*newest)
        .limit(limit)
        .subquery(f"state_{at}")
        for at, state in enumerate(states)
    ]
    # SQLite refuses ORDER BY and LIMIT inside a compound SELECT's members: each member reads
    # from its own subquery.
    merged = sa.union_all(*(sa.select(*branch.c) for branch in per_state)).subquery("found")
    return sa.select(*merged.c).order_by(merged.c.updated_at.desc(), merged.c.id).limit(limit)


def _pipelines() -> sa.CTE:
    """The name of every pipeline that has jobs, each found by one seek of the
    `(pipeline, event_id)` index for the next name after the last (a skip scan)."""
    found = sa.select(sa.func.min(jobs.c.pipeline).label("name")).cte("pipelines", recursive=True)
    later = jobs.alias("later")
    following = sa.select(
        sa.select(sa.func.min(later.c.pipeline))
        .where(later.c.pipeline > found.c.name)
        .scalar_subquery()
    ).where(found.c.name.is_not(None))
    return found.union_all(following)
