"""Crashes do not matter: workers killed at every point of the step protocol, paused past their
lease, killed by a poison order or stopped mid-task lose nothing and double nothing, counted at
the provider."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from typing import Any

import pytest

from config.settings import CrashPoint, CrashRule
from ledger import JobState, StepState
from tests.factories import order_event
from tests.system.conftest import System, SystemFactory, per_order

pytestmark = pytest.mark.system

#: Short leases and sweeps: what a crash leaves behind is found in seconds.
CRASH_SETTINGS = {
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_STEP_TIME_LIMIT": "2",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "5",
    "ONCELERY_PROVIDER_TIMEOUT": "1",
}
STEPS = ("gather", "act", "publish")


def events(prefix: str, count: int, **fields: object) -> list[dict[str, object]]:
    return [
        order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}", **fields)
        for n in range(count)
    ]


def assert_exactly_once(system: System, prefix: str, count: int) -> None:
    """Every order succeeded with one charge and one notification, and the audit is clean."""
    assert system.store.count_by_state(event_prefix=prefix)[JobState.SUCCEEDED] == count
    orders = {f"{prefix}{n}": 1 for n in range(count)}
    effects = system.effects()
    assert per_order(effects, "charge") == orders
    assert per_order(effects, "notification") == orders
    audit = system.cli_json("audit")
    assert audit["clean"], audit["drift"]


def crashed(system: System, step: str, point: CrashPoint, job_id: str) -> bool:
    """Whether the `once` rule for this cell killed a worker (its marker, as `Crasher` names
    it, exists)."""
    rule = CrashRule.parse(f"{step}:{point}:once:{job_id}")
    name = hashlib.sha256(f"{rule}|{job_id}".encode()).hexdigest()[:32]
    return (system.data_dir / "crash-markers" / name).exists()


def step_view(system: System, job_id: str, step: str) -> dict[str, Any]:
    views: list[dict[str, Any]] = [s for s in system.history(job_id)["steps"] if s["name"] == step]
    return views[0]


@pytest.mark.parametrize(
    ("broker", "fast_path", "batch_size"),
    [
        ("amqp", False, 16),
        ("redis", False, 16),
        ("amqp", True, 16),
        ("redis", True, 16),
        ("amqp", True, 1),
    ],
    ids=["amqp-chained", "redis-chained", "amqp-fast", "redis-fast", "amqp-fast-unbatched"],
)
def test_every_crash_point_of_every_step(
    broker: str,
    fast_path: bool,
    batch_size: int,
    postgres_url: str,
    request: pytest.FixtureRequest,
    system_factory: SystemFactory,
) -> None:
    # Given one order per (step, crash point), enqueued before any worker runs, in either mode;
    # the workers take the queued orders in batches, or one message at a time
    broker_url = str(request.getfixturevalue(f"{broker}_url"))
    env = {
        **CRASH_SETTINGS,
        "ONCELERY_FAST_PATH": str(fast_path).lower(),
        "ONCELERY_BATCH_SIZE": str(batch_size),
    }
    system = system_factory(
        database_url=postgres_url, broker_url=broker_url, workers=0, extra_env=env
    )
    # The step runner's points; the timer loop's own (after_fire) is test_timers'.
    points = [point for point in CrashPoint if point is not CrashPoint.AFTER_FIRE]
    cells = [(step, point) for step in STEPS for point in points]
    prefix = f"matrix-{uuid.uuid4().hex[:6]}-"
    job_ids = system.enqueue(events(prefix, len(cells) + 2))  # two orders no rule touches
    rules = ",".join(
        f"{step}:{point}:once:{job}" for (step, point), job in zip(cells, job_ids, strict=False)
    )

    # When two workers armed with every crash point run them, with beat sweeping
    for number in range(2):
        system.start_worker(f"armed{number}", extra_env={"ONCELERY_CRASH_POINTS": rules})
    system.start_beat()
    system.wait_finished(prefix, len(job_ids), timeout=120)

    # Then every cell crashed once, and still every order was done exactly once. In a batch,
    # a job's record is committed with its neighbours' before each job's after-record points:
    # a neighbour's crash there may carry the job past its own (it was recorded, and then
    # its worker died; the next run finds it done)
    assert_exactly_once(system, prefix, len(job_ids))
    for (step, point), job in zip(cells, job_ids, strict=False):
        past_record = point in (CrashPoint.AFTER_RECORD, CrashPoint.AFTER_PUBLISH)
        if batch_size == 1 or not past_record:
            assert crashed(system, step, point, job), (step, point)
    for (step, point), job in zip(cells, job_ids, strict=False):
        if point in (CrashPoint.AFTER_CLAIM, CrashPoint.AFTER_ACT):
            view = step_view(system, job, step)
            # A provider call that outlasts its timeout on a loaded machine adds a failed
            # attempt of its own: only the attempts the crash cost are counted here.
            failed = sum(event["kind"] == "failed" for event in view["events"])
            attempts = view["attempts"] - failed
            # The crash left the key started, and a later run took it over: two attempts.
            # Gather, a read-only step, runs unclaimed on its first delivery: dying there
            # costs nothing, and its redelivery claims it once. But a gather whose message
            # came again before its crash (the sweep re-sent a job waiting for slow-booting
            # workers; a redelivery) was claimed by the run that died: two, like the others.
            # In a batch, a neighbour's crash may have cost the key an attempt before that.
            fewest, most = (1, 2) if step == "gather" else (2, 2)
            if batch_size > 1:
                most = attempts
            assert fewest <= attempts <= most, f"{step} {point} {view}"


def test_lost_replies_are_charged_once_under_one_key(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given payments that apply 30 % of charges and then never answer
    system = system_factory(
        database_url=postgres_url, broker_url=redis_url, extra_env=CRASH_SETTINGS
    )
    system.faults(service="payments", lost_reply_rate=0.3)
    prefix = f"lostreply-{uuid.uuid4().hex[:6]}-"

    system.enqueue(events(prefix, 40))
    system.wait_finished(prefix, 40)

    # Then each order was charged once, and every attempt carried the same key
    assert_exactly_once(system, prefix, 40)
    keys: dict[str, set[str]] = {}
    for request in system.requests():
        if request["service"] == "payments":
            order = str(request["idempotency_key"]).split(":")[1]
            keys.setdefault(order, set()).add(str(request["idempotency_key"]))
    assert all(len(k) == 1 for k in keys.values())
    lost = [r for r in system.requests() if r["fault"] == "lost_reply"]
    assert len(lost) >= 5, "the sandbox should really have lost replies"


def test_a_crash_after_an_unkeyed_effect_is_unknown_and_not_resent(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    from jobs.engine.enqueue import start_jobs
    from jobs.pipelines import registry
    from jobs.worker import CeleryDispatch, client_app
    from tests.conftest import settings_for
    from tests.toy_pipeline import toy_once  # noqa: F401 - declares the pipeline

    # Given a provider that ignores keys, and an at-most-once step whose worker dies after
    # acting and before recording
    system = system_factory(
        database_url=postgres_url,
        broker_url=redis_url,
        workers=0,
        sandbox_options=["--no-idempotency"],
        extra_env=CRASH_SETTINGS,
    )
    settings = settings_for(
        database_url=postgres_url, broker_url=redis_url, data_dir=system.data_dir
    )
    word = f"ambiguous{uuid.uuid4().hex[:6]}"
    [job] = start_jobs(
        system.store,
        CeleryDispatch(sender=client_app(settings)),
        registry.get("toy-once"),
        [registry.get("toy-once").new_job(f"amb-{word}", {"word": word})],
    )
    system.start_worker(
        "armed", extra_env={"ONCELERY_CRASH_POINTS": f"announce:after_act:once:{job.job_id}"}
    )
    system.start_beat()

    # Then, once its lease runs out, the step is unknown and the job dead-lettered
    system.wait_finished("amb-", 1, timeout=60)
    announce = step_view(system, job.job_id, "announce")
    assert announce["state"] == "unknown"
    [letter] = system.cli_json("dlq", "list")["dead_letters"]
    assert letter["reason"] == "outcome_unknown"
    # And nothing was resent: one notification, from the attempt that died
    # (2 s: two sweeps, one a second here; a message a sweep sent would act in milliseconds)
    time.sleep(2)
    assert per_order(system.effects(), "notification") == {f"toy-{word}": 1}


def test_a_zombie_worker_is_fenced(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given a slow payments service and one worker acting on a charge; the provider timeout
    # leaves the healthy worker's 800 ms charge a second of headroom, so it is not retried
    system = system_factory(
        database_url=postgres_url,
        broker_url=amqp_url,
        workers=0,
        extra_env={**CRASH_SETTINGS, "ONCELERY_PROVIDER_TIMEOUT": "1.8"},
    )
    system.faults(service="payments", latency_ms=800)
    zombie = system.start_worker("zombie", concurrency=1)
    prefix = f"zombie-{uuid.uuid4().hex[:6]}-"
    [job_id] = system.enqueue(events(prefix, 1))
    # Read from the ledger in-process: a CLI call (`step_view`) can outlast the 800 ms charge,
    # and the worker would then be paused at the next step instead.
    system.wait_for(
        lambda: any(
            entry.step == "act" and entry.state is StepState.STARTED
            for entry in system.store.history(uuid.UUID(job_id)).entries
        ),
        "the charge to start",
    )

    # When the worker is paused past its lease and another one finishes the job
    zombie.signal(signal.SIGSTOP)
    try:
        system.start_worker("healthy")
        system.start_beat()
        system.wait_finished(prefix, 1, timeout=60)
    finally:
        zombie.signal(signal.SIGCONT)

    # Then the woken zombie records nothing (its owner token is fenced out, or its time
    # limit, which ran on while it slept, strikes first), and nothing is doubled
    def zombie_stopped() -> bool:
        log = zombie.log_path.read_text()
        return "was taken over" in log or "time limit" in log.lower()

    system.wait_for(zombie_stopped, "the zombie to wake up and be stopped")
    # (2 s: two sweeps, one a second here, and four times a retry's longest backoff, 0.5 s)
    time.sleep(2)
    assert_exactly_once(system, prefix, 1)
    assert step_view(system, job_id, "act")["attempts"] == 2
    publishes = [
        e for e in step_view(system, job_id, "publish")["events"] if e["kind"] == "succeeded"
    ]
    assert len(publishes) == 1


@pytest.mark.parametrize("step", ["gather", "act"])
def test_a_poison_order_is_dead_lettered_and_harms_nobody(
    step: str, postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given an order whose step kills its worker every time, among healthy ones (gather reads
    # unclaimed at first: the redelivery claims, so every such death still counts)
    env = {
        **CRASH_SETTINGS,
        "ONCELERY_STEP_POLICIES": json.dumps({f"order-placed.{step}": {"max_attempts": 3}}),
    }
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=0, extra_env=env
    )
    prefix = f"poison-{uuid.uuid4().hex[:6]}-"
    job_ids = system.enqueue(events(prefix, 6))
    poison = job_ids[0]
    system.start_worker(
        "armed", extra_env={"ONCELERY_CRASH_POINTS": f"{step}:after_claim:always:{poison}"}
    )
    system.start_beat()

    # Then the poison order is dead-lettered with reason worker_lost after its attempts
    counts = system.wait_finished(prefix, 6, timeout=90)
    assert (counts[JobState.SUCCEEDED], counts[JobState.DEAD_LETTERED]) == (5, 1)
    [letter] = system.cli_json("dlq", "list")["dead_letters"]
    assert (letter["job_id"], letter["reason"], letter["attempts"]) == (poison, "worker_lost", 4)
    charges = per_order(system.effects(), "charge")
    assert f"{prefix}0" not in charges
    assert charges == {f"{prefix}{n}": 1 for n in range(1, 6)}


def test_sigterm_to_a_busy_worker_loses_nothing(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given a busy worker: twenty orders with slow charges
    system = system_factory(
        database_url=postgres_url, broker_url=redis_url, workers=0, extra_env=CRASH_SETTINGS
    )
    system.faults(service="payments", latency_ms=300)
    busy = system.start_worker("busy")
    prefix = f"sigterm-{uuid.uuid4().hex[:6]}-"
    system.enqueue(events(prefix, 20))
    system.wait_for(
        lambda: any(e["kind"] == "charge" for e in system.effects()), "the first charge"
    )

    # When it is asked to stop (warm shutdown), and a replacement starts
    busy.terminate()
    assert busy.popen.wait(timeout=60) == 0
    system.started.remove(busy)
    busy.stop()
    system.start_worker("replacement")
    system.start_beat()

    # Then every order completes exactly once
    system.wait_finished(prefix, 20, timeout=90)
    assert_exactly_once(system, prefix, 20)
