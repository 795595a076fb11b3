"""The map step on the real ledger (Postgres and SQLite), driven without Celery: a dispatch
that queues what would be published, and a loop that runs it — every message twice where a
test says so, as a broker redelivering after a crash between the record and the ack would."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa

from jobs.engine.items import run_items
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import QueueLoss, redrive_items
from jobs.errors import PermanentError
from jobs.maps import Expand, ItemContext, MapPolicy, MapStep
from jobs.ops.audit import map_drift
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.ops.history import history_view
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from ledger import JSON, DeadLetterStore, ItemState, JobState, MapLedger, Reopened
from ledger.map_views import MapViews
from ledger.schema import jobs, maps
from tests.conftest import settings_for
from tests.factories import RetryRequested

_names = itertools.count()


@dataclass
class World:
    """What the toy map's functions do and saw, changed by each test."""

    #: Items whose act fails for good, by item id.
    failing: set[str] = field(default_factory=set)
    acted: Counter[str] = field(default_factory=Counter)
    joins: list[list[tuple[str, str, JSON]]] = field(default_factory=list)


class QueueDispatch:
    """Queues what would be published: step messages and item messages."""

    def __init__(self) -> None:
        self.queue: deque[tuple[str, str, str, list[str] | None]] = deque()
        self.fail_items = False

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        self.queue.append((pipeline, step, job_id, None))

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
        if self.fail_items:
            return list(item_ids)
        for start in range(0, len(item_ids), 7):
            self.queue.append((pipeline, step, job_id, list(item_ids[start : start + 7])))
        return []

    def retry_later(self, delay: float) -> NoReturn:
        raise RetryRequested(delay)


def build(
    world: World,
    policy: MapPolicy = MapPolicy.ALL_SUCCEED,
    delivery: Delivery = Delivery.EXACTLY_ONCE,
    max_failed: int | None = None,
) -> Pipeline[World]:
    def plan(ctx: StepContext[World]) -> list[object]:
        return [{"id": f"r{n}", "depth": 0} for n in range(int(str(ctx.context["roots"])))]

    def each(ctx: ItemContext[World]) -> object:
        ctx.resources.acted[ctx.item_id] += 1
        if ctx.item_id in ctx.resources.failing:
            raise PermanentError("this item cannot be done")
        item = ctx.item
        assert isinstance(item, dict)
        depth = int(str(item["depth"]))
        if depth < 2 and ctx.item_id.endswith("0"):
            children: list[JSON] = [
                {"id": f"{ctx.item_id}.{n}", "depth": depth + 1} for n in range(3)
            ]
            # One child twice, and one the map has already: each item is added once.
            children.append(children[0])
            children.append({"id": "r1", "depth": 0})
            return Expand(items=children, result={"split": ctx.item_id})
        return {"seen": ctx.item_id}

    return toy_map(
        world,
        "map",
        plan,
        each,
        policy=policy,
        max_failed=max_failed,
        delivery=delivery,
        effect="visit",
    )


def toy_map(
    world: World,
    name: str,
    plan: Callable[[StepContext[World]], object],
    each: Callable[[ItemContext[World]], object],
    **options: Any,
) -> Pipeline[World]:
    """A pipeline of a map step `search` (`plan`, `each`, and the MapStep's other `options`)
    and a join `publish` that records every item's (id, state, result) in the world."""

    def join(ctx: StepContext[World]) -> object:
        seen = [(each.item_id, str(each.state), each.result) for each in ctx.items("search")]
        ctx.resources.joins.append(seen)
        return {"items": len(seen)}

    return Pipeline(
        name=f"{name}-{next(_names)}-{uuid.uuid4().hex[:6]}",
        steps=[
            MapStep(
                "search",
                plan,  # type: ignore[arg-type]
                key="crawl:{crawl}:search",
                each=each,  # type: ignore[arg-type]
                item_id=lambda item: str(item["id"]),  # type: ignore[call-overload,index]
                **options,
            ),
            Step("publish", join, key="crawl:{crawl}:publish"),  # type: ignore[arg-type]
        ],
        resources=lambda _settings: world,
    )


def start(rt: Runtime, pipeline: Pipeline[World], roots: int) -> str:
    context: dict[str, JSON] = {"crawl": uuid.uuid4().hex, "roots": roots}
    [(job_id, _)] = rt.store.create_jobs([pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)])
    return str(job_id)


def drain(rt: Runtime, dispatch: QueueDispatch, pipeline: Pipeline[World], *, twice: bool) -> None:
    """Run every queued message (each twice when `twice`) until none is left."""
    while dispatch.queue:
        name, step, job_id, items = dispatch.queue.popleft()
        assert name == pipeline.name
        for _ in range(2 if twice else 1):
            if items is None:
                run_step(rt, dispatch, pipeline, pipeline.step(step), job_id)  # type: ignore[arg-type]
            else:
                map_step = pipeline.step(step)
                assert isinstance(map_step, MapStep)
                run_items(rt, dispatch, pipeline, map_step, job_id, items)  # type: ignore[arg-type]


def tree_ids(roots: int) -> list[str]:
    """The items of a map of `roots` roots, in item order (see `build`)."""

    def below(item_id: str, depth: int) -> list[str]:
        if depth < 2 and item_id.endswith("0"):
            kids = [f"{item_id}.{n}" for n in range(3)]
            return [item_id] + [i for kid in kids for i in below(kid, depth + 1)]
        return [item_id]

    return [i for n in range(roots) for i in below(f"r{n}", 0)]


@pytest.mark.parametrize("twice", [False, True], ids=["once", "redelivered"])
def test_a_map_fans_out_expands_and_joins_once(runtime: Runtime, twice: bool) -> None:
    # Given a map of 25 roots, every tenth of which splits (and its first child again)
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    job_id = start(runtime, pipeline, roots=25)
    dispatch.send(pipeline.name, "search", job_id)

    # When every message runs (twice each: a redelivery after each record)
    drain(runtime, dispatch, pipeline, twice=twice)

    # Then every item acted once, the join ran once and read every item in item order
    expected = tree_ids(25)
    assert sorted(world.acted) == sorted(expected)
    assert set(world.acted.values()) == {1}
    assert len(world.joins) == 1
    assert [item_id for item_id, _, _ in world.joins[0]] == expected
    assert all(state == "done" for _, state, _ in world.joins[0])
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert job.state is JobState.SUCCEEDED
    assert job.results["search"] == {
        "total": len(expected),
        "done": len(expected),
        "failed": 0,
        "waiting": 0,
        "pending": 0,
        "expanded": 6,
        "joined": True,
    }
    # And the history sums the map up instead of listing its items
    history = runtime.store.history(uuid.UUID(job_id))
    assert len(history.entries) == 2
    steps = history_view(history)["steps"]
    assert isinstance(steps, list)
    search = steps[0]
    assert isinstance(search, dict)
    assert search["items"] == job.results["search"]
    # And the audit finds the map's counters, items and join in agreement
    assert map_drift(MapViews(engine=runtime.engine)) == []


def test_a_failed_item_waits_for_its_replay_then_the_join_runs_once(runtime: Runtime) -> None:
    world, dispatch = World(failing={"r3"}), QueueDispatch()
    pipeline = build(world)
    job_id = start(runtime, pipeline, roots=8)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)

    # The failed item is dead-lettered on its own; the others are done, the job waits
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step, world.joins) == (JobState.RUNNING, "search", [])
    [counters] = runtime.maps.counters(uuid.UUID(job_id))
    assert (counters.failed, counters.remaining, counters.pending) == (1, 1, 0)
    assert map_drift(MapViews(engine=runtime.engine)) == []
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = letters.list(job_id=uuid.UUID(job_id))
    assert letter.key is not None
    assert letter.key.endswith("/r3")
    assert letter.input["item_id"] == "r3"  # type: ignore[index,call-overload]

    # When a person fixes it and replays that item alone
    world.failing.clear()
    reopened = letters.replay(letter.id, by="test", allow_unknown=False)
    assert isinstance(reopened, Reopened)
    assert reopened.item_id == "r3"
    dispatch.send_items(pipeline.name, "search", job_id, [reopened.item_id])
    drain(runtime, dispatch, pipeline, twice=True)

    # Then the join runs once, with every item done
    assert len(world.joins) == 1
    assert {state for _, state, _ in world.joins[0]} == {"done"}
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED
    again = letters.replay(letter.id, by="test", allow_unknown=False)
    assert not isinstance(again, Reopened)
    assert map_drift(MapViews(engine=runtime.engine)) == []


def test_all_settled_lets_the_join_see_the_failures(runtime: Runtime) -> None:
    world, dispatch = World(failing={"r2", "r5"}), QueueDispatch()
    pipeline = build(world, MapPolicy.ALL_SETTLED)
    job_id = start(runtime, pipeline, roots=6)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=True)

    [seen] = world.joins
    failed = {item_id: result for item_id, state, result in seen if state == "failed"}
    assert set(failed) == {"r2", "r5"}
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED
    # Its dead letters stay, but the join saw them: replaying one changes nothing now
    letters = DeadLetterStore(engine=runtime.engine)
    first = letters.list(job_id=uuid.UUID(job_id))[0]
    assert not isinstance(letters.replay(first.id, by="test", allow_unknown=False), Reopened)


def test_a_threshold_settles_that_many_failures_and_waits_on_the_next(
    runtime: Runtime,
) -> None:
    # Given a map that lets one item fail, and two that do
    world, dispatch = World(failing={"r2", "r5"}), QueueDispatch()
    pipeline = build(world, MapPolicy.THRESHOLD, max_failed=1)
    job_id = start(runtime, pipeline, roots=6)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=True)

    # Then the first failure settles, the second waits for a person: no join yet
    assert world.joins == []
    [counters] = runtime.maps.counters(uuid.UUID(job_id))
    assert (counters.failed, counters.waiting, counters.remaining) == (2, 1, 1)
    states = {
        each.item_id: each.state for each in runtime.maps.item_results(uuid.UUID(job_id), "search")
    }
    waiting = [item_id for item_id, state in states.items() if state is ItemState.WAITING]
    assert len(waiting) == 1

    # When a person fixes and replays the waiting item, the join runs once, seeing one failure
    world.failing.discard(waiting[0])
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = [
        each
        for each in letters.list(job_id=uuid.UUID(job_id))
        if each.key and each.key.endswith(f"/{waiting[0]}")
    ]
    reopened = letters.replay(letter.id, by="test", allow_unknown=False)
    assert isinstance(reopened, Reopened)
    dispatch.send_items(pipeline.name, "search", job_id, [waiting[0]])
    drain(runtime, dispatch, pipeline, twice=True)
    [seen] = world.joins
    assert [state for _, state, _ in seen].count("failed") == 1
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


def test_a_map_of_no_items_goes_straight_to_its_join(runtime: Runtime) -> None:
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    job_id = start(runtime, pipeline, roots=0)
    dispatch.send(pipeline.name, "search", job_id)
    drain(runtime, dispatch, pipeline, twice=False)
    assert world.joins == [[]]
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED


def test_the_sweeper_sends_items_left_in_the_outbox_or_abandoned(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    # Given a map whose items' publish failed: they stay in the outbox
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    job_id = start(runtime, pipeline, roots=5)
    dispatch.fail_items = True
    assert run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id) is (  # type: ignore[arg-type]
        Outcome.SUCCEEDED
    )
    assert not dispatch.queue
    dispatch.fail_items = False

    # When the sweeper runs past the relay time, it sends them, and the map completes
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, relay_after=0.001
    )
    assert redrive_items(runtime, dispatch, stalled_after=3600, pipelines=[pipeline.name]) == 5
    assert redrive_items(runtime, dispatch, stalled_after=3600, pipelines=[pipeline.name]) == 0

    # A broker that lost its queues lost their messages: the items it held are sent again
    dispatch.queue.clear()
    loss = QueueLoss(before=-1.0, after=None, reason="restarted without its data")
    ours = [pipeline.name]
    assert redrive_items(runtime, dispatch, stalled_after=3600, pipelines=ours, loss=loss) == 5

    # An item claimed by an owner that died (its lease expired) is sent again at once
    _, _, _, first = dispatch.queue[0]
    assert first is not None
    short = MapLedger(engine=runtime.engine, lease_seconds=0.001)
    short.claim_items(uuid.UUID(job_id), "search", first[:1])
    assert redrive_items(runtime, dispatch, stalled_after=3600, pipelines=[pipeline.name]) == 1
    drain(runtime, dispatch, pipeline, twice=False)
    assert len(world.joins) == 1
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.SUCCEEDED
    items = list(runtime.maps.item_results(uuid.UUID(job_id), "search", page=2))
    assert [each.state for each in items] == [ItemState.DONE] * len(items)
    # And the sweeper's pace counts the items done (they write no history of their own)
    assert runtime.maps.recent_items(window=60) >= len(items)


def test_an_at_most_once_item_whose_owner_vanished_is_unknown_and_dead_lettered(
    runtime: Runtime,
) -> None:
    # Given an at-most-once map whose item r1 was claimed by an owner that died
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world, delivery=Delivery.AT_MOST_ONCE)
    job_id = start(runtime, pipeline, roots=3)
    dispatch.fail_items = True
    run_step(runtime, dispatch, pipeline, pipeline.step("search"), job_id)  # type: ignore[arg-type]
    dispatch.fail_items = False
    short = MapLedger(engine=runtime.engine, lease_seconds=0.001)
    [claimed] = short.claim_items(uuid.UUID(job_id), "search", ["r1"], takeover_expired=False)
    assert not isinstance(claimed, Exception)

    # When its message comes back
    map_step = pipeline.step("search")
    assert isinstance(map_step, MapStep)
    outcomes = run_items(runtime, dispatch, pipeline, map_step, job_id, ["r0", "r1", "r2"])  # type: ignore[arg-type]

    # Then it is not acted on again: its key is unknown and it is dead-lettered on its own
    assert outcomes == [Outcome.SUCCEEDED, Outcome.DEAD_LETTERED, Outcome.SUCCEEDED]
    assert "r1" not in world.acted
    [letter] = DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id))
    assert str(letter.reason) == "outcome_unknown"
    [counters] = runtime.maps.counters(uuid.UUID(job_id))
    # (r0 split into three, pending)
    assert (counters.done, counters.failed, counters.remaining) == (2, 1, 4)
    # And a replay waits for a person to check the provider (--force)
    desk = DeadLetterDesk(
        store=runtime.store, letters=DeadLetterStore(engine=runtime.engine), dispatch=dispatch
    )
    refused = desk.replay(letter, by="test", force=False)
    assert not refused.done
    assert "unknown" in refused.detail
    forced = desk.replay(letter, by="test", force=True)
    assert forced.done, forced.detail
    assert dispatch.queue[-1][3] == ["r1"]


def test_the_audit_finds_a_map_whose_counters_or_join_disagree(runtime: Runtime) -> None:
    # Given a map that ran to its join, and one whose items all settled, waiting at its join
    world, dispatch = World(), QueueDispatch()
    pipeline = build(world)
    joined = start(runtime, pipeline, roots=12)
    dispatch.send(pipeline.name, "search", joined)
    drain(runtime, dispatch, pipeline, twice=False)
    assert map_drift(MapViews(engine=runtime.engine)) == []

    # When one counter is off by one (an item counted twice), and the join is undone
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.update(maps).where(maps.c.job_id == uuid.UUID(joined)).values(done=maps.c.done + 1)
        )
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == uuid.UUID(joined))
            .values(state="running", current_step="search")
        )

    # Then the audit names both, for that map alone
    [drift] = map_drift(MapViews(engine=runtime.engine))
    assert (drift.problem, drift.kind) == ("map_mismatch", "map")
    assert f"{pipeline.name}.search of job {joined}" in drift.detail
    assert "counter done=" in drift.detail
    assert "joined, but its job still waits at the map" in drift.detail
