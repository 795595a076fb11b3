"""Limits on the real ledger (Postgres and SQLite), driven without Celery: a step refused its
slot waits as a timer (no attempt used, its history says for what) and runs once the timer
loop sends it again (in a round with other kinds of timers); a map's items paced by a rate
limit, each claimed just before it acts."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from jobs.engine.items import run_items
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.timers import fire_round, resend_unsent
from jobs.errors import TransientError
from jobs.limits import ConcurrencyLimit, RateLimit
from jobs.maps import ItemContext, MapStep
from jobs.ops.history import history_view
from jobs.ops.metrics import render_metrics
from jobs.ops.status import status_view
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.worker import CeleryDispatch
from ledger import JSON, Claim, EventKind, JobState, LedgerStats
from ledger.schema import ledger_entries, limit_keys, timers
from tests.factories import RecordingDispatch
from tests.integration.jobs.engine.test_map_step import QueueDispatch, World, drain, toy_map
from tests.integration.jobs.engine.test_retry_timers import HOUR, make_due, pipeline_failing
from tests.integration.jobs.engine.test_retry_timers import start as start_retrying
from tests.integration.jobs.engine.test_timers import sleeping
from tests.integration.jobs.engine.test_timers import start as start_sleeping
from tests.waiting import wait_for

_names = itertools.count()


def _charge(ctx: StepContext[None]) -> JSON:
    return {"charged": ctx.context["order"]}


def charging() -> Pipeline[None]:
    return Pipeline(
        name=f"limited-{next(_names)}-{uuid.uuid4().hex[:6]}",
        steps=[
            Step(
                "charge",
                _charge,
                key="o:{order}:charge",
                limits=[ConcurrencyLimit("customer:{customer}", 1)],
            ),
            Step("notify", _charge, key="o:{order}:notify"),
        ],
        resources=lambda _settings: None,
    )


def start(rt: Runtime, pipeline: Pipeline[Any], **context: JSON) -> str:
    new = pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)
    [(job_id, _)] = rt.store.create_jobs([new])
    return str(job_id)


def test_a_step_refused_its_slot_waits_as_a_timer_then_runs_once(runtime: Runtime) -> None:
    # Given two orders of one customer, one at a time, the first's charge held elsewhere
    pipeline, dispatch = charging(), RecordingDispatch()
    charge = pipeline.step("charge")
    holder = start(runtime, pipeline, order="o1", customer="c1")
    waiter = start(runtime, pipeline, order="o2", customer="c1")
    rules = runtime.limits_for(pipeline.name, charge)  # type: ignore[arg-type]
    held = runtime.ledger.claim_step(uuid.UUID(holder), "charge", limits=rules)
    assert isinstance(held, Claim)

    # When the second's message runs
    outcome = run_step(runtime, dispatch, pipeline, charge, waiter)  # type: ignore[arg-type]

    # Then it waits: nothing claimed (no attempt used), nothing published, a timer set, and
    # its history says what it waits for
    assert outcome is Outcome.WAITING
    assert dispatch.sent == []
    history = runtime.store.history(uuid.UUID(waiter))
    assert history.entries == ()
    assert [event.kind for event in history.events] == [EventKind.LIMITED]
    view = history_view(history)
    assert view["waiting"] == "waiting for limit `customer:c1`"
    # and status and the metrics count the customer's slot in use, one run waiting
    sender = CeleryDispatch(settings=runtime.settings).sender
    status = status_view(LedgerStats(engine=runtime.engine), sender, window=60)
    limits: Any = status["limits"]
    assert {key: (v["in_use"], v["waiting"]) for key, v in limits.items()} == {
        "customer:c1": (1, 1)
    }
    metrics = render_metrics(runtime, sender)[0].decode()
    assert 'oncelery_limit_waiting{key="customer:c1",kind="concurrency"} 1.0' in metrics
    assert 'oncelery_limit_in_use{key="customer:c1",kind="concurrency"} 1.0' in metrics

    # When the holder records, and the timer loop fires the wait
    runtime.ledger.record_success(held, {"ok": True}, next_step="notify", duration_ms=1.0)
    wait_for(lambda: fire_round(runtime, dispatch) == 1, "the limit timer to fire", timeout=10)

    # Then the step is sent again, on the retry queue, and runs once, its first attempt
    assert (dispatch.sent, dispatch.resent) == ([(pipeline.name, "charge", waiter)], [waiter])
    assert fire_round(runtime, dispatch) == 0
    outcome = run_step(runtime, dispatch, pipeline, charge, waiter)  # type: ignore[arg-type]
    assert outcome is Outcome.SUCCEEDED
    view = history_view(runtime.store.history(uuid.UUID(waiter)))
    steps: Any = view["steps"]
    assert view["waiting"] is None
    assert (steps[0]["state"], steps[0]["attempts"]) == ("succeeded", 1)


def test_a_maps_items_are_paced_by_their_rate_limit(runtime: Runtime) -> None:
    # Given a map of 12 items under a rate limit of 10 a second (a token at most 0.5 s ahead)
    acted: list[tuple[float, float]] = []

    def each(ctx: ItemContext[World]) -> JSON:
        # Items run one at a time here, each claimed just before it acts: the key's arrival
        # time now is the one this item's token moved on, its token's time one interval
        # before (burst 1). Measured at token time, not at action time: a busy machine
        # delays one action and not the next, bunching actions that the limit spaced.
        now = time.time()
        with runtime.engine.connect() as conn:
            tat = conn.execute(
                sa.select(limit_keys.c.tat).where(limit_keys.c.key == "provider:places")
            ).scalar()
        acted.append(((tat or 0.0) - interval, now))  # no token: 0, the spacing fails
        return {"seen": ctx.item_id}

    world, dispatch = World(), QueueDispatch()
    pipeline = toy_map(
        world,
        "paced",
        lambda ctx: [{"id": f"r{n}", "kind": "places"} for n in range(12)],
        each,
        limits=[RateLimit("provider:{item[kind]}", 10)],
    )
    rules = runtime.limits_for(pipeline.name, pipeline.step("search"))  # type: ignore[arg-type]
    assert rules is not None
    assert rules.rate is not None
    interval = rules.rate.interval
    context: dict[str, JSON] = {"crawl": uuid.uuid4().hex}
    [(job, _)] = runtime.store.create_jobs([pipeline.new_job(f"evt-{job_id()}", context)])
    dispatch.send(pipeline.name, "search", str(job))

    # When its messages run, and the timer loop sends again what waited
    def done() -> bool:
        drain(runtime, dispatch, pipeline, twice=False)
        fired = fire_round(runtime, dispatch)
        return fired == 0 and runtime.store.get_job(job).state is JobState.SUCCEEDED

    wait_for(done, "the map to be done", timeout=30)

    # Then every item acted once, its token at least 1/10 s after the one before, and no
    # item acted before its token's time (the same host's clock: 10 ms for rounding)
    assert len(acted) == 12
    tokens = sorted(token for token, _ in acted)
    assert min(later - earlier for earlier, later in itertools.pairwise(tokens)) >= 0.1
    assert all(at >= token - 0.01 for token, at in acted)
    # and the items that waited used no attempt for it
    with runtime.engine.connect() as conn:
        attempts = conn.execute(ledger_entries.select().where(ledger_entries.c.job_id == job)).all()
    assert {row.attempts for row in attempts} == {1}


def job_id() -> str:
    return uuid.uuid4().hex


def test_items_run_alone_under_a_rate_limit(runtime: Runtime) -> None:
    # A message of several items runs them one by one, each claimed just before it acts.
    world, dispatch = World(), QueueDispatch()
    pipeline = toy_map(
        world,
        "alone",
        lambda ctx: [{"id": f"r{n}"} for n in range(3)],
        lambda ctx: {"ok": True},
        limits=[RateLimit("p", 1000)],
    )
    [(job, _)] = runtime.store.create_jobs([pipeline.new_job(f"evt-{job_id()}", {"crawl": "x"})])
    run_step(runtime, dispatch, pipeline, pipeline.step("search"), str(job))  # type: ignore[arg-type]
    _, step, _, items = dispatch.queue.popleft()
    assert items is not None
    map_step = pipeline.step(step)
    assert isinstance(map_step, MapStep)
    outcomes = run_items(runtime, dispatch, pipeline, map_step, str(job), items)  # type: ignore[arg-type]
    assert outcomes == [Outcome.SUCCEEDED] * 3


def test_a_limit_wait_fires_in_one_round_with_a_sleep_and_a_long_retry(runtime: Runtime) -> None:
    # Given a step waiting for its slot, a job asleep and a step whose retry waits as a
    # timer, all three due at once
    dispatch = RecordingDispatch()
    limited = charging()
    holder = start(runtime, limited, order="o1", customer="c1")
    waiter = start(runtime, limited, order="o2", customer="c1")
    rules = runtime.limits_for(limited.name, limited.step("charge"))  # type: ignore[arg-type]
    held = runtime.ledger.claim_step(uuid.UUID(holder), "charge", limits=rules)
    assert isinstance(held, Claim)
    charge = limited.step("charge")
    assert run_step(runtime, dispatch, limited, charge, waiter) is Outcome.WAITING  # type: ignore[arg-type]
    runtime.ledger.record_success(held, {"ok": True}, next_step="notify", duration_ms=1.0)
    asleep = sleeping(seconds=3600)
    sleeper = start_sleeping(runtime, asleep)
    assert run_step(runtime, dispatch, asleep, asleep.step("first"), sleeper) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    failing = pipeline_failing([TransientError("429", retry_after=HOUR)])
    retrying = start_retrying(runtime, failing)
    for step, expected in (("first", Outcome.SUCCEEDED), ("second", Outcome.RETRYING)):
        assert run_step(runtime, dispatch, failing, failing.step(step), retrying) is expected  # type: ignore[arg-type]
    for job in (waiter, sleeper, retrying):
        make_due(runtime, job)
    dispatch.sent.clear()

    # When one round fires them (set-based on Postgres)
    assert fire_round(runtime, dispatch) == 3

    # Then the waiting step and the retry are sent again on the retry queue, the job
    # asleep moves on to the step after its sleep, and nothing is left to fire or resend
    assert sorted(dispatch.sent) == sorted(
        [
            (limited.name, "charge", waiter),
            (asleep.name, "second", sleeper),
            (failing.name, "second", retrying),
        ]
    )
    assert sorted(dispatch.resent) == sorted([waiter, retrying])
    assert fire_round(runtime, dispatch) == 0
    assert resend_unsent(runtime, dispatch, runtime.timers, after="timer") == 0
    assert run_step(runtime, dispatch, limited, charge, waiter) is Outcome.SUCCEEDED  # type: ignore[arg-type]


def test_a_limit_waits_lost_publish_is_resent_as_its_own_step_while_the_job_is_at_it(
    runtime: Runtime,
) -> None:
    # Given a step that waited for its customer's slot, its timer fired but its publish
    # lost (the broker down), the firing older than `relay_after`
    pipeline, dispatch = charging(), RecordingDispatch()
    charge = pipeline.step("charge")
    holder = start(runtime, pipeline, order="o1", customer="c9")
    waiter = start(runtime, pipeline, order="o2", customer="c9")
    rules = runtime.limits_for(pipeline.name, charge)  # type: ignore[arg-type]
    held = runtime.ledger.claim_step(uuid.UUID(holder), "charge", limits=rules)
    assert isinstance(held, Claim)
    assert run_step(runtime, dispatch, pipeline, charge, waiter) is Outcome.WAITING  # type: ignore[arg-type]
    runtime.ledger.record_success(held, {"ok": True}, next_step="notify", duration_ms=1.0)
    make_due(runtime, waiter)
    assert fire_round(runtime, RecordingDispatch(fail=True)) == 1
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.update(timers)
            .where(timers.c.job_id == uuid.UUID(waiter))
            .values(fired_at=timers.c.fired_at - timedelta(seconds=60))
        )

    # When the sweeper's resend runs, twice
    sent = [resend_unsent(runtime, dispatch, runtime.timers, after="timer") for _ in range(2)]

    # Then the waiting step itself is sent once more, on the retry queue (not the step
    # after it, as for a sleep), and runs once
    assert sent == [1, 0]
    assert (dispatch.sent, dispatch.resent) == ([(pipeline.name, "charge", waiter)], [waiter])
    assert run_step(runtime, dispatch, pipeline, charge, waiter) is Outcome.SUCCEEDED  # type: ignore[arg-type]


def test_a_map_items_limit_wait_whose_publish_was_lost_is_resent_as_that_item(
    runtime: Runtime,
) -> None:
    # Given a map of 3 items under a rate limit of one a second: two items wait as timers
    world, dispatch = World(), QueueDispatch()
    pipeline = toy_map(
        world,
        "lost",
        lambda ctx: [{"id": f"r{n}"} for n in range(3)],
        lambda ctx: {"ok": True},
        limits=[RateLimit(f"p-{job_id()}", 1)],
    )
    [(job, _)] = runtime.store.create_jobs([pipeline.new_job(f"evt-{job_id()}", {"crawl": "x"})])
    dispatch.send(pipeline.name, "search", str(job))
    drain(runtime, dispatch, pipeline, twice=False)
    # and their timers fired, the items' publish lost, the firing older than `relay_after`
    make_due(runtime, str(job))
    dispatch.fail_items = True
    assert fire_round(runtime, dispatch) == 2
    dispatch.fail_items = False
    with runtime.engine.begin() as conn:
        conn.execute(
            sa.update(timers)
            .where(timers.c.job_id == job)
            .values(fired_at=timers.c.fired_at - timedelta(seconds=60))
        )

    # When the sweeper's resend runs, twice
    sent = [resend_unsent(runtime, dispatch, runtime.timers, after="timer") for _ in range(2)]

    # Then each waiting item is sent once more, alone, as an item of the map step
    assert sent == [2, 0]
    assert sorted(dispatch.queue) == [
        (pipeline.name, "search", str(job), ["r1"]),
        (pipeline.name, "search", str(job), ["r2"]),
    ]
