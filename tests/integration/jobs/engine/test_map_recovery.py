"""The map step's recovery on the real ledger (Postgres and SQLite), driven without Celery as
in `test_map_step`: a join whose publish was lost, an item that kills its worker, the sweeper
during a big fan-out's publish, and prune of a big map."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from jobs.engine.fan_out import publish_items
from jobs.engine.items import run_items
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import redrive_items
from jobs.maps import ItemContext, MapPolicy, MapStep
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.pipelines import Pipeline, StepContext
from jobs.retry import RetryPolicy
from ledger import DeadLetterReason, DeadLetterStore, JobState
from ledger.schema import ledger_entries, map_items
from tests.conftest import settings_for
from tests.integration.jobs.engine.test_map_holes import start_with
from tests.integration.jobs.engine.test_map_step import (
    QueueDispatch,
    World,
    build,
    drain,
    toy_map,
    tree_ids,
)


class LosingDispatch(QueueDispatch):
    """Loses the first publish of the join (the worker died just after the record that
    joined the map), and remembers which message's run lost it."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[str] | None = None
        self.lost_in: list[str] | None = None

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        if step == "publish" and self.lost_in is None:
            self.lost_in = self.running
            raise ConnectionError("the broker went away")
        super().send(pipeline, step, job_id, resend=resend, countdown=countdown)


def test_a_redelivered_last_item_publishes_a_lost_join_again(runtime: Runtime) -> None:
    # Given a map whose join's publish was lost after the record that joined it
    world, dispatch = World(), LosingDispatch()
    pipeline = build(world)
    map_step = pipeline.step("search")
    assert isinstance(map_step, MapStep)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=9)
    run_step(runtime, dispatch, pipeline, map_step, job_id)  # type: ignore[arg-type]
    while dispatch.queue:
        _, _, _, items = dispatch.queue.popleft()
        assert items is not None
        dispatch.running = items
        run_items(runtime, dispatch, pipeline, map_step, job_id, items)  # type: ignore[arg-type]
    assert dispatch.lost_in is not None
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step, world.joins) == (JobState.RUNNING, "publish", [])

    # When that message is redelivered (its items all settled now)
    outcomes = run_items(runtime, dispatch, pipeline, map_step, job_id, dispatch.lost_in)  # type: ignore[arg-type]

    # Then it publishes the join again (once), and the join runs once
    assert set(outcomes) == {Outcome.DUPLICATE}
    assert [step for _, step, _, _ in dispatch.queue] == ["publish"]
    drain(runtime, dispatch, pipeline, twice=True)
    assert len(world.joins) == 1
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


class Crash(BaseException):
    """What a worker's death looks like to the run: nothing after it happens."""


def poisoned(world: World, crawl: str) -> Pipeline[World]:
    """A map of p, a, b whose item p kills its worker every time it acts."""

    def plan(ctx: StepContext[World]) -> list[object]:
        return [{"id": "p"}, {"id": "a"}, {"id": "b"}]

    def each(ctx: ItemContext[World]) -> object:
        ctx.resources.acted[ctx.item_id] += 1
        if ctx.item_id == "p":
            raise Crash
        return {"seen": ctx.item_id}

    return toy_map(
        world, "poison", plan, each, policy=MapPolicy.ALL_SETTLED, retry=RetryPolicy(max_attempts=3)
    )


def test_a_poison_item_does_not_take_its_message_mates_down(runtime: Runtime) -> None:
    # Given a message of p, a, b whose p kills its worker every time
    world, dispatch = World(), QueueDispatch()
    crawl = uuid.uuid4().hex
    pipeline = poisoned(world, crawl)
    map_step = pipeline.step("search")
    assert isinstance(map_step, MapStep)
    job_id = start_with(runtime, pipeline, crawl, roots=0)
    run_step(runtime, dispatch, pipeline, map_step, job_id)  # type: ignore[arg-type]
    [(_, _, _, items)] = list(dispatch.queue)
    dispatch.queue.clear()
    assert items == ["p", "a", "b"]

    # When the worker dies on it, and the broker redelivers it (after the leases ran out),
    # again and again
    for delivery in range(6):
        try:
            run_items(runtime, dispatch, pipeline, map_step, job_id, items, repeat=delivery > 0)  # type: ignore[arg-type]
        except Crash:
            with runtime.engine.begin() as conn:
                conn.execute(
                    sa.update(ledger_entries)
                    .where(ledger_entries.c.key.like(f"crawl:{crawl}:search/%"))
                    .values(locked_until=ledger_entries.c.created_at)
                )
        else:
            break
    drain(runtime, dispatch, pipeline, twice=False)

    # Then p alone is dead-lettered (its worker lost); a and b are done, each acted once
    [seen] = world.joins
    assert sorted(seen) == [
        ("a", "done", {"seen": "a"}),
        ("b", "done", {"seen": "b"}),
        ("p", "failed", None),
    ]
    assert (world.acted["a"], world.acted["b"], world.acted["p"]) == (1, 1, 3)
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert letter.reason is DeadLetterReason.WORKER_LOST
    assert letter.key is not None
    assert letter.key.endswith("/p")


class SweptDispatch(QueueDispatch):
    """Runs the sweeper while the first slice of items is being published (the publish of a
    big fan-out is slow), and counts what it re-sent."""

    def __init__(self, runtime: Runtime, pipeline: str) -> None:
        super().__init__()
        self.runtime, self.pipeline = runtime, pipeline
        self.swept: int | None = None

    def send_items(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        item_ids: Sequence[str],
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> list[str]:
        if self.swept is None:
            sweeper = QueueDispatch()
            rt, ours = self.runtime, [self.pipeline]
            self.swept = redrive_items(rt, sweeper, stalled_after=3600, pipelines=ours)
        return super().send_items(
            pipeline, step, job_id, item_ids, resend=resend, countdown=countdown
        )


def test_the_sweeper_leaves_a_big_fan_outs_items_alone_while_they_are_published(
    runtime: Runtime,
) -> None:
    # Given a fan-out of 2,500 items written 10 s ago (a long record), not yet published
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    map_step = pipeline.step("search")
    assert isinstance(map_step, MapStep)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=2500)
    dispatch.fail_items = True
    run_step(runtime, dispatch, pipeline, map_step, job_id)  # type: ignore[arg-type]
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.update(map_items)
            .where(map_items.c.job_id == uuid.UUID(job_id))
            .values(updated_at=map_items.c.updated_at - timedelta(seconds=10))
        )
    ids = [each.item_id for each in runtime.maps.item_results(uuid.UUID(job_id), "search")]

    # When they are published (the fan-out's publish), with the sweeper running meanwhile
    swept = SweptDispatch(runtime, pipeline.name)
    publish_items(runtime, swept, pipeline, map_step, job_id, ids)  # type: ignore[arg-type]

    # Then the sweeper sent none of them again, and every one was published once
    assert swept.swept == 0
    published = [item for _, _, _, items in swept.queue for item in items or []]
    assert sorted(published) == sorted(ids)
    sweeper = QueueDispatch()
    assert redrive_items(runtime, sweeper, stalled_after=3600, pipelines=[pipeline.name]) == 0


def test_prune_deletes_a_maps_items_in_chunks_before_its_job(runtime: Runtime) -> None:
    # Given a finished map of 25 roots (43 items)
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=25)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED
    deletes: list[int] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM MAP_ITEMS"):
            deletes.append(len(deletes))

    # When it is pruned, 10 items at a time
    sa.event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        assert runtime.store.prune(older_than=0.0, item_batch=10) == 1
    finally:
        sa.event.remove(runtime.engine, "before_cursor_execute", count)

    # Then its items went in five statements (each its own transaction), then the job
    assert len(tree_ids(25)) == 43
    assert len(deletes) == 5
    with runtime.engine.connect() as conn:
        left = conn.execute(
            sa.select(sa.func.count()).where(map_items.c.job_id == uuid.UUID(job_id))
        ).scalar_one()
        entries = conn.execute(
            sa.select(sa.func.count()).where(ledger_entries.c.job_id == uuid.UUID(job_id))
        ).scalar_one()
    assert (left, entries) == (0, 0)
    assert runtime.store.list_jobs(pipeline=pipeline.name) == []


def test_a_replayed_item_whose_send_failed_is_sent_by_the_sweeper(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    # Given an all_succeed map whose r3 failed for good, fixed since
    world, dispatch = World(failing={"r3"}), QueueDispatch()
    pipeline = build(world)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=6)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    world.failing.clear()
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = letters.list(job_id=uuid.UUID(job_id))
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, relay_after=0.001
    )
    ours = [pipeline.name]

    # When its replay is not sent (the broker is down), the sweeper sends it from the outbox
    dispatch.fail_items = True
    desk = DeadLetterDesk(store=runtime.store, letters=letters, dispatch=dispatch)
    replayed = desk.replay(letter, by="ops", force=False)
    assert replayed.done, replayed.detail
    assert "not sent" in replayed.detail
    dispatch.fail_items = False
    assert redrive_items(runtime, dispatch, stalled_after=3600, pipelines=ours) == 1
    drain(runtime, dispatch, pipeline, twice=False)
    assert len(world.joins) == 1
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED
