"""The map step's edges on the real ledger (Postgres and SQLite), driven without Celery as in
`test_map_step`: two jobs sharing a map step key, an item expanding into an id the map has
with other content, and what the dead-letter desk does with an item's letter."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa

from jobs.engine.fan_out import publish_items
from jobs.engine.items import run_items
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import redrive_items
from jobs.maps import Expand, ItemContext, MapPolicy, MapStep
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.retry import RetryPolicy
from ledger import (
    JSON,
    Claim,
    DeadLetterReason,
    DeadLetterStore,
    Failure,
    JobState,
    NewJob,
    Refused,
    StepLedger,
    StepState,
)
from ledger.schema import ledger_entries, map_items
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


def clashing(world: World) -> Pipeline[World]:
    """A map of r0..r3 where r0 expands into `r1` with other content than the map's r1, and
    r2 into `r3` with the same content (the same item)."""

    def plan(ctx: StepContext[World]) -> list[object]:
        return [{"id": f"r{n}", "depth": 0} for n in range(4)]

    def each(ctx: ItemContext[World]) -> object:
        ctx.resources.acted[ctx.item_id] += 1
        if ctx.item_id == "r0":
            return Expand(items=[{"id": "r1", "depth": 1}, {"id": "r0.0", "depth": 1}])
        if ctx.item_id == "r2":
            return Expand(items=[{"id": "r3", "depth": 0}])
        return {"seen": ctx.item_id}

    def join(ctx: StepContext[World]) -> object:
        seen = [(each.item_id, str(each.state), each.result) for each in ctx.items("search")]
        ctx.resources.joins.append(seen)
        return {"items": len(seen)}

    return Pipeline(
        name=f"clash-{uuid.uuid4().hex[:8]}",
        steps=[
            MapStep(
                "search",
                plan,  # type: ignore[arg-type]
                key="crawl:{crawl}:search",
                each=each,  # type: ignore[arg-type]
                item_id=lambda item: str(item["id"]),  # type: ignore[call-overload,index]
                policy=MapPolicy.ALL_SETTLED,
            ),
            Step("publish", join, key="crawl:{crawl}:publish"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: world,
    )


def test_an_expansion_into_an_id_the_map_has_with_other_content_fails_its_parent(
    runtime: Runtime,
) -> None:
    # Given a map whose r0 expands into r1 with other content (and r2 into r3, the same)
    world, dispatch = World(), QueueDispatch()
    pipeline = clashing(world)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=0)
    dispatch.send(pipeline.name, "search", job_id)

    # When every message runs (twice: redelivered after each record)
    drain(runtime, dispatch, pipeline, twice=True)

    # Then r0 failed, dead-lettered naming the id it clashed on (not done with the clash
    # dropped), none of its children was added, and r2's expansion into r3 counted r3 once
    [seen] = world.joins
    states = {item_id: state for item_id, state, _ in seen}
    assert states == {"r0": "failed", "r1": "done", "r2": "done", "r3": "done"}
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert letter.key is not None
    assert letter.key.endswith("/r0")
    assert "'r1'" in letter.message
    assert "other content" in letter.message
    assert world.acted["r3"] == 1


def test_resolving_an_items_letter_as_succeeded_lets_the_map_join(runtime: Runtime) -> None:
    # Given an all_succeed map whose r3 failed for good: the map waits for it
    world, dispatch = World(failing={"r3"}), QueueDispatch()
    pipeline = build(world)
    job_id = start_with(runtime, pipeline, uuid.uuid4().hex, roots=6)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = letters.list(job_id=uuid.UUID(job_id))
    desk = DeadLetterDesk(store=runtime.store, letters=letters, dispatch=dispatch)

    # When a person says it did take effect (resolve --as succeeded)
    resolved = desk.resolve(letter, by="ops", result={"by": "hand"})

    # Then the item is done with that result, and the join (sent by the desk) runs once
    assert resolved.done, resolved.detail
    assert "item r3 done" in resolved.detail
    drain(runtime, dispatch, pipeline, twice=True)
    [seen] = world.joins
    assert ("r3", "done", {"by": "hand"}) in seen
    assert world.acted["r3"] == 1
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


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


def test_the_join_does_not_read_another_requests_result_for_an_item(runtime: Runtime) -> None:
    # Given an all_settled map whose item r1's key another request recorded first
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world, MapPolicy.ALL_SETTLED)
    crawl = uuid.uuid4().hex
    other = NewJob(
        pipeline="plain",
        event_id=f"evt-{uuid.uuid4().hex}",
        context={},
        fingerprint="0" * 64,
        step_keys={"first": f"crawl:{crawl}:search/r1"},
        first_step="first",
    )
    [(other_id, _)] = runtime.store.create_jobs([other])
    ledger = StepLedger(engine=runtime.engine, lease_seconds=30)
    [claim] = ledger.claim_steps([other_id], "first")
    assert isinstance(claim, Claim)
    ledger.record_success(claim, {"secret": "not this map's"}, next_step=None, duration_ms=1.0)

    # When the map runs
    job_id = start_with(runtime, pipeline, crawl, roots=3)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)

    # Then r1 failed (its key is another request's), and the join reads no result for it
    [seen] = world.joins
    assert [each for each in seen if each[0] == "r1"] == [("r1", "failed", None)]
    assert "r1" not in world.acted
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert letter.reason is DeadLetterReason.FINGERPRINT_MISMATCH


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

    def join(ctx: StepContext[World]) -> object:
        seen = [(each.item_id, str(each.state), each.result) for each in ctx.items("search")]
        ctx.resources.joins.append(seen)
        return {"items": len(seen)}

    return Pipeline(
        name=f"poison-{uuid.uuid4().hex[:8]}",
        steps=[
            MapStep(
                "search",
                plan,  # type: ignore[arg-type]
                key="crawl:{crawl}:search",
                each=each,  # type: ignore[arg-type]
                item_id=lambda item: str(item["id"]),  # type: ignore[call-overload,index]
                policy=MapPolicy.ALL_SETTLED,
                retry=RetryPolicy(max_attempts=3),
            ),
            Step("publish", join, key="crawl:{crawl}:publish"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: world,
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


def test_an_items_letter_never_settles_or_resets_another_requests_key(runtime: Runtime) -> None:
    # Given a map whose item r1's key another request holds, failed (retryable)
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    crawl = uuid.uuid4().hex
    key = f"crawl:{crawl}:search/r1"
    other = NewJob(
        pipeline="plain",
        event_id=f"evt-{uuid.uuid4().hex}",
        context={},
        fingerprint="0" * 64,
        step_keys={"first": key},
        first_step="first",
    )
    [(other_id, _)] = runtime.store.create_jobs([other])
    ledger = StepLedger(engine=runtime.engine, lease_seconds=30)
    [claim] = ledger.claim_steps([other_id], "first")
    assert isinstance(claim, Claim)
    ledger.record_failure(claim, Failure({"message": "503"}, retry_in=1.0))
    job_id = start_with(runtime, pipeline, crawl, roots=3)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = letters.list(job_id=uuid.UUID(job_id))
    assert letter.reason is DeadLetterReason.FINGERPRINT_MISMATCH

    # When a person resolves the item's letter as succeeded, or replays it
    resolved = letters.settle(letter.id, by="ops", result={"by": "hand"}, next_step="publish")
    replayed = letters.replay(letter.id, by="ops", allow_unknown=True)

    # Then both are refused, and the other request's key is as it was
    assert isinstance(resolved, Refused), resolved
    assert isinstance(replayed, Refused), replayed
    assert "another request" in resolved.reason
    [(_, entry)] = runtime.store.entries_of_steps([("plain", "first")], keys=[key])
    assert (entry.state, entry.attempts) == (StepState.FAILED, 1)


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
