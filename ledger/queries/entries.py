"""The ledger entries as people and the sweeper read them: one key, a job's keys, the keys of
some steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from ledger.queries.maps import not_an_item_key
from ledger.schema import jobs, ledger_entries, step_events


def select_entry(key: str) -> sa.Select[Any]:
    """One ledger entry."""
    return sa.select(ledger_entries).where(ledger_entries.c.key == key)


def select_entries_for_job(job_id: UUID) -> sa.Select[Any]:
    """The entries a job claimed, or adopted from another job, oldest first."""
    adopted = sa.select(step_events.c.key).where(
        step_events.c.job_id == job_id, step_events.c.key.is_not(None)
    )
    return (
        sa.select(ledger_entries)
        .where(
            sa.or_(ledger_entries.c.job_id == job_id, ledger_entries.c.key.in_(adopted)),
            # A map step's items are summed up, not listed: a map may have 100,000.
            not_an_item_key(job_id, ledger_entries.c.key),
        )
        .order_by(ledger_entries.c.created_at)
    )


def select_entries_of_steps(
    steps: Sequence[tuple[str, str]], keys: Sequence[str] | None
) -> sa.Select[Any]:
    """The entries of some (pipeline, step) pairs, with their pipeline; optionally of some keys."""
    pairs = [
        sa.and_(jobs.c.pipeline == pipeline, ledger_entries.c.step == step)
        for pipeline, step in steps
    ]
    query = (
        sa.select(ledger_entries, jobs.c.pipeline)
        .join(jobs, jobs.c.id == ledger_entries.c.job_id)
        .where(sa.or_(sa.false(), *pairs))
        .order_by(ledger_entries.c.key)
    )
    if keys is not None:
        query = query.where(ledger_entries.c.key.in_(keys))
    return query


def select_effects_in_context(pipeline_prefix: str) -> sa.Select[Any]:
    """Each pipeline named with `pipeline_prefix` whose jobs' context names the kind of effect
    they apply (`effect`), with that kind."""
    effect = jobs.c.context["effect"].as_string()
    return (
        sa.select(jobs.c.pipeline, effect.label("effect"))
        .where(jobs.c.pipeline.startswith(pipeline_prefix, autoescape=True), effect.is_not(None))
        .distinct()
    )
