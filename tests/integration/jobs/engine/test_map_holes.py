"""The map step's edges on the real ledger (Postgres and SQLite), driven without Celery as in
`test_map_step`: two jobs sharing a map step key, an item expanding into an id the map has
with other content, an item whose key another request holds, and resolving an item's letter."""

from __future__ import annotations

import uuid

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.maps import Expand, ItemContext, MapPolicy
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.pipelines import Pipeline, StepContext
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
from tests.integration.jobs.engine.test_map_step import (
    QueueDispatch,
    World,
    build,
    drain,
    toy_map,
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

    return toy_map(world, "clash", plan, each, policy=MapPolicy.ALL_SETTLED)


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
