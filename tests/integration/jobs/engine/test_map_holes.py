"""The map step's edges on the real ledger (Postgres and SQLite), driven without Celery as in
`test_map_step`: two jobs sharing a map step key, an item expanding into an id the map has
with other content, and what the dead-letter desk does with an item's letter."""

from __future__ import annotations

import uuid

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.pipelines import Pipeline
from ledger import JSON, DeadLetterReason, DeadLetterStore, JobState
from tests.integration.jobs.engine.test_map_step import (
    QueueDispatch,
    World,
    build,
    drain,
    tree_ids,
)


def start_with(rt: Runtime, pipeline: Pipeline[World], crawl: str, roots: int) -> str:
    context: dict[str, JSON] = {"crawl": crawl, "roots": roots}
    [(job_id, _)] = rt.store.create_jobs([pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)])
    return str(job_id)


def test_a_map_step_key_recorded_by_another_job_is_not_adopted(runtime: Runtime) -> None:
    # Given two jobs of one map whose map step key is the same (one crawl, sent twice)
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    crawl = uuid.uuid4().hex
    first = start_with(runtime, pipeline, crawl, roots=12)
    second = start_with(runtime, pipeline, crawl, roots=12)

    # When the first fans out, then the second's map step runs
    first_ran = run_step(runtime, dispatch, pipeline, pipeline.step("search"), first)  # type: ignore[arg-type]
    assert first_ran is Outcome.SUCCEEDED
    second_ran = run_step(runtime, dispatch, pipeline, pipeline.step("search"), second)  # type: ignore[arg-type]
    drain(runtime, dispatch, pipeline, twice=False)

    # Then the second is dead-lettered, naming the job that holds the key; it never joins
    assert second_ran is Outcome.DEAD_LETTERED
    assert runtime.store.get_job(uuid.UUID(second)).state is JobState.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(second))
    assert letter.reason is DeadLetterReason.PERMANENT
    assert first in letter.message
    # And the first joins once, on every one of its items
    assert len(world.joins) == 1
    assert [item_id for item_id, _, _ in world.joins[0]] == tree_ids(12)
    job = runtime.store.get_job(uuid.UUID(first))
    assert job.state is JobState.SUCCEEDED
    assert job.results["publish"] == {"items": len(tree_ids(12))}
