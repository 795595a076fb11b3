"""`find_jobs` (`oncelery jobs`) on Postgres and SQLite: its filters, its order, its limit; and
on Postgres, among thousands of analysed jobs, that it reads a few index entries, not the
table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import JobState, find_jobs
from ledger.queries.job_search import select_found_jobs
from ledger.schema import jobs

START = datetime(2026, 1, 1, tzinfo=UTC)


def job_row(n: int, pipeline: str, state: JobState, **context: Any) -> dict[str, Any]:
    """The `jobs` row of job `n`, created and last changed `n` seconds after START."""
    at = START + timedelta(seconds=n)
    ended = state in (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)
    return {
        "id": uuid.UUID(int=n + 1),
        "pipeline": pipeline,
        "event_id": f"evt-{n}",
        "state": str(state),
        "context": {"order_id": f"ord-{n}", **context},
        "fingerprint": "f" * 64,
        "step_keys": {},
        "results": {},
        "current_step": None if ended else "act",
        "created_at": at - timedelta(seconds=1),
        "updated_at": at,
        "finished_at": at if ended else None,
        "dispatched_at": at,
    }


def seed(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(jobs), rows)


def ids(found: list[Any]) -> list[int]:
    return [job.id.int - 1 for job in found]


def test_filters_order_and_limit(engine: sa.Engine) -> None:
    # Given jobs of two pipelines in several states, one event id used by both pipelines
    rows = [
        job_row(0, "order-placed", JobState.SUCCEEDED),
        job_row(1, "order-placed", JobState.RUNNING),
        job_row(2, "toy", JobState.DEAD_LETTERED),
        job_row(3, "order-placed", JobState.PENDING),
        job_row(4, "toy", JobState.SUCCEEDED, order_id="ord-1"),
        job_row(5, "order-placed", JobState.SUCCEEDED),
    ]
    rows[5]["event_id"] = "evt-2"
    seed(engine, rows)

    # Then every job, the most recently changed first; a limit keeps the newest
    assert ids(find_jobs(engine)) == [5, 4, 3, 2, 1, 0]
    assert ids(find_jobs(engine, limit=2)) == [5, 4]
    # and each filter, alone or together
    assert ids(find_jobs(engine, states=[JobState.SUCCEEDED])) == [5, 4, 0]
    assert ids(find_jobs(engine, states=[JobState.RUNNING, JobState.PENDING])) == [3, 1]
    assert ids(find_jobs(engine, pipeline="toy")) == [4, 2]
    assert ids(find_jobs(engine, pipeline="toy", states=[JobState.SUCCEEDED])) == [4]
    assert ids(find_jobs(engine, event_id="evt-2")) == [5, 2]
    assert ids(find_jobs(engine, event_id="evt-2", pipeline="toy")) == [2]
    assert ids(find_jobs(engine, event_id="evt-2", states=[JobState.SUCCEEDED])) == [5]
    assert ids(find_jobs(engine, order_id="ord-1")) == [4, 1]
    assert ids(find_jobs(engine, order_id="ord-1", pipeline="order-placed")) == [1]
    assert find_jobs(engine, event_id="evt-9") == []
    # and a job reads back whole
    [job] = find_jobs(engine, event_id="evt-0")
    assert job.context == {"order_id": "ord-0"}
    assert job.finished_at == START


def test_an_empty_ledger(engine: sa.Engine) -> None:
    assert find_jobs(engine) == []
    assert find_jobs(engine, event_id="evt-1") == []


MANY = 6_000
LIMIT = 20
STATES = (JobState.SUCCEEDED,) * 8 + (JobState.RUNNING, JobState.DEAD_LETTERED)


def rows_read(node: dict[str, Any]) -> int:
    own = 0
    if node.get("Relation Name") == "jobs" and "Actual Rows" in node:
        removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Recheck", 0)
        own = (node["Actual Rows"] + removed) * node.get("Actual Loops", 1)
    return own + sum(rows_read(child) for child in node.get("Plans", []))


@pytest.mark.parametrize(
    ("filters", "most"),
    [
        # Each state's index read backwards: LIMIT rows, and one more to see the last row's
        # `updated_at` tie broken by id.
        ({}, (LIMIT + 1) * len(JobState)),
        ({"states": [JobState.RUNNING]}, LIMIT + 1),
        ({"event_id": "evt-4321"}, 10),
        ({"event_id": "evt-4321", "pipeline": "toy"}, 2),
    ],
)
def test_a_search_reads_indexes_not_the_table(
    postgres_url: str, filters: dict[str, Any], most: int
) -> None:
    # Given thousands of jobs of three pipelines, analysed
    engine = sa.create_engine(postgres_url)
    try:
        pipelines = ("order-placed", "order-fulfilment", "toy")
        seed(
            engine,
            [job_row(n, pipelines[n % 3], STATES[n % len(STATES)]) for n in range(MANY)],
        )
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE jobs"))

        # When a search is run, explained with what it read
        states = filters.pop("states", list(JobState))
        query = select_found_jobs(states, LIMIT, **filters)
        compiled = query.compile(engine, compile_kwargs={"render_postcompile": True})
        with engine.connect() as conn:
            plan: list[dict[str, Any]] = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}", compiled.params
            ).scalar_one()

        # Then it read a few rows of `jobs`, however many there are
        assert rows_read(plan[0]["Plan"]) <= most, plan
    finally:
        engine.dispose()
