"""The statements of decorated Celery tasks' calls (`jobs.tasks`) beyond the sweeper's takes:
the calls a call handed on to, and the calls no worker claims."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from ledger import db
from ledger.queries.common import ACTIVE
from ledger.queries.sweeps import context_member
from ledger.schema import jobs, step_events
from ledger.types import EventKind


def count_unclaimed_redrives(job_ids: Sequence[UUID]) -> sa.Select[Any]:
    """(job id, re-drives) of the given jobs that no worker ever claimed: their `redriven`
    events less their `resend_failed` ones, since their last replay or resolve (a person's
    decision starts a fresh count)."""
    event, later = step_events.alias("event"), step_events.alias("later")
    restarted = sa.exists().where(
        later.c.job_id == event.c.job_id,
        later.c.id > event.c.id,
        later.c.kind.in_([str(EventKind.REPLAYED), str(EventKind.RESOLVED)]),
    )
    sent = sa.case((event.c.kind == str(EventKind.REDRIVEN), 1), else_=-1)
    return (
        sa.select(event.c.job_id, sa.func.sum(sent).label("redrives"))
        .join(jobs, jobs.c.id == event.c.job_id)
        .where(
            event.c.job_id.in_(list(job_ids)),
            event.c.kind.in_([str(EventKind.REDRIVEN), str(EventKind.RESEND_FAILED)]),
            jobs.c.started_at.is_(None),
            ~restarted,
        )
        .group_by(event.c.job_id)
    )


def select_unclaimed_calls(
    prefix: str, excluded: Sequence[str], queues: Sequence[str], older_than: float, limit: int
) -> sa.Select[Any]:
    """Unfinished jobs of pipelines starting with `prefix` but not of `excluded`, whose kept
    message (`context.message`) goes to one of `queues`, that no worker ever claimed and
    nobody touched for `older_than` seconds (since they were made, or replayed), oldest
    first."""
    options = ("message", "options")
    queue = sa.func.coalesce(
        jobs.c.context[(*options, "queue")].as_string(),
        jobs.c.context[(*options, "routing_key")].as_string(),
    )
    return (
        sa.select(jobs)
        .where(
            jobs.c.state.in_(ACTIVE),
            jobs.c.updated_at < db.utcnow_plus(db.seconds(-older_than)),
            jobs.c.started_at.is_(None),
            jobs.c.pipeline.startswith(prefix, autoescape=True),
            jobs.c.pipeline.not_in(list(excluded)),
            queue.in_(list(queues)),
        )
        .order_by(jobs.c.updated_at)
        .limit(limit)
    )


def count_children(dialect_name: str, task_id: str) -> sa.Select[Any]:
    """How many jobs name the call with Celery task id `task_id` as their parent (the calls it
    handed on to), by migration 0006's index on `parent`."""
    return sa.select(sa.func.count()).where(context_member(dialect_name, "parent") == task_id)
