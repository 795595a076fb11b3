"""A map step whose run is a generator (Postgres and SQLite): its items are written as it
yields them, a few batches at a time, never all held; a generator that fails, or yields one
id with two contents, leaves nothing written; the publish reads the outbox a slice at a
time, in item order."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from jobs.engine.fan_out import PUBLISH_SLICE
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.errors import PermanentError, TransientError
from jobs.maps import ItemContext
from jobs.pipelines import Pipeline, StepContext
from ledger import JSON, DeadLetterStore, JobState
from ledger.fan_in import INSERT_BATCH
from ledger.schema import map_items
from tests.factories import RetryRequested
from tests.integration.jobs.engine.test_map_step import QueueDispatch, World, drain, start, toy_map

#: More than two slices of the publish and two batches of the insert.
COUNT = 2 * PUBLISH_SLICE + 600


class Inserts:
    """Counts the INSERTs of map items the engine has run so far."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._seen)
        self._engine = engine

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MAP_ITEMS"):
            self.count += 1

    def close(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._seen)


def _done(ctx: ItemContext[World]) -> JSON:
    ctx.resources.acted[ctx.item_id] += 1
    return {"seen": ctx.item_id}


def _stream_map(world: World, yields: Any) -> Pipeline[World]:
    def plan(ctx: StepContext[World]) -> Iterator[JSON]:
        return iter(yields(int(str(ctx.context["roots"]))))

    return toy_map(world, "stream", plan, _done)


def _items_of(runtime: Runtime, job_id: str) -> int:
    with runtime.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(map_items.c.job_id == uuid.UUID(job_id))
        return int(conn.execute(query).scalar_one())


def test_a_generators_items_are_written_as_it_yields_them_and_published_in_order(
    runtime: Runtime,
) -> None:
    inserts = Inserts(runtime.engine)
    written_before_the_end: list[int] = []

    def yields(count: int) -> Iterator[JSON]:
        for n in range(count):
            yield {"id": f"r{n:05d}"}
            if n == 7:
                yield {"id": "r00003"}  # the same item again: one item
        # Before the last item, earlier batches were already sent to the ledger
        written_before_the_end.append(inserts.count)

    world, dispatch = World(), QueueDispatch()
    pipeline = _stream_map(world, yields)
    job_id = start(runtime, pipeline, roots=COUNT)
    try:
        outcome = run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id)  # type: ignore[arg-type]
    finally:
        inserts.close()

    assert outcome is Outcome.SUCCEEDED
    assert written_before_the_end == [COUNT // INSERT_BATCH]
    # Every item published once, in item order, and none left in the outbox
    published = [item for _, _, _, ids in dispatch.queue for item in ids or []]
    assert published == [f"r{n:05d}" for n in range(COUNT)]
    assert runtime.maps.outbox_page(uuid.UUID(job_id), "search", after="", limit=10) == []
    assert runtime.store.get_job(uuid.UUID(job_id)).results["search"] == {"items": COUNT}

    drain(runtime, dispatch, pipeline, twice=False)
    assert set(world.acted.values()) == {1}
    assert len(world.acted) == COUNT
    assert [len(join) for join in world.joins] == [COUNT]
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


def test_a_generator_that_fails_for_good_midway_leaves_no_items(runtime: Runtime) -> None:
    def yields(count: int) -> Iterator[JSON]:
        for n in range(count):
            if n == INSERT_BATCH + 10:
                raise PermanentError("the area is not on the map")
            yield {"id": f"r{n}"}

    world, dispatch = World(), QueueDispatch()
    pipeline = _stream_map(world, yields)
    job_id = start(runtime, pipeline, roots=COUNT)

    outcome = run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id)  # type: ignore[arg-type]

    assert outcome is Outcome.DEAD_LETTERED
    assert _items_of(runtime, job_id) == 0
    assert not dispatch.queue
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert (letter.error_type, letter.message) == ("PermanentError", "the area is not on the map")
    assert runtime.maps.counters(uuid.UUID(job_id)) == []


def test_a_generator_that_fails_for_now_is_retried_and_its_next_attempt_fans_out(
    runtime: Runtime,
) -> None:
    attempts: Counter[str] = Counter()

    def yields(count: int) -> Iterator[JSON]:
        attempts["plan"] += 1
        for n in range(count):
            if n == INSERT_BATCH + 10 and attempts["plan"] == 1:
                raise TransientError("the map service timed out")
            yield {"id": f"r{n}"}

    world, dispatch = World(), QueueDispatch()
    pipeline = _stream_map(world, yields)
    job_id = start(runtime, pipeline, roots=COUNT)
    step = pipeline.step("search")

    with pytest.raises(RetryRequested):
        run_step(runtime, dispatch, pipeline, step, job_id)  # type: ignore[arg-type]
    assert _items_of(runtime, job_id) == 0

    assert run_step(runtime, dispatch, pipeline, step, job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    assert _items_of(runtime, job_id) == COUNT
    assert attempts["plan"] == 2


def test_one_id_yielded_with_two_contents_fails_the_step_naming_it(runtime: Runtime) -> None:
    def yields(count: int) -> Iterator[JSON]:
        for n in range(count):
            yield {"id": f"r{n}"}
        yield {"id": "r5", "other": True}

    world, dispatch = World(), QueueDispatch()
    pipeline = _stream_map(world, yields)
    job_id = start(runtime, pipeline, roots=COUNT)

    outcome = run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id)  # type: ignore[arg-type]

    assert outcome is Outcome.DEAD_LETTERED
    assert _items_of(runtime, job_id) == 0
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert "'r5'" in letter.message


def test_a_run_that_returns_neither_a_list_nor_an_iterator_fails_for_good(
    runtime: Runtime,
) -> None:
    world, dispatch = World(), QueueDispatch()
    pipeline = toy_map(world, "dict", lambda ctx: {"id": "r1"}, _done)
    job_id = start(runtime, pipeline, roots=1)

    outcome = run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id)  # type: ignore[arg-type]

    assert outcome is Outcome.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert "a list or an iterator" in letter.message
