"""The order-placed pipeline end to end, over RabbitMQ, Redis and the embedded default: real
workers, a real sandbox injecting faults, effects counted where the money would move."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from ledger import JobState
from tests.factories import order_event
from tests.system.conftest import SystemFactory, per_order

pytestmark = pytest.mark.system

ORDERS = 200


@pytest.fixture(params=["amqp", "redis", "embedded"])
def system_urls(request: pytest.FixtureRequest) -> tuple[str | None, str | None]:
    """(database URL, broker URL): Postgres with each real broker, or nothing (embedded)."""
    if request.param == "embedded":
        return None, None
    return request.getfixturevalue("postgres_url"), request.getfixturevalue(f"{request.param}_url")


@pytest.mark.parametrize("fast_path", [False, True], ids=["chained", "fast"])
def test_orders_complete_exactly_once_despite_faults(
    fast_path: bool, system_urls: tuple[str | None, str | None], system_factory: SystemFactory
) -> None:
    # Given a sandbox that answers 20 % of calls with a 5xx, and two real workers (each step
    # its own message, or the fast path)
    database_url, broker_url = system_urls
    system = system_factory(
        database_url=database_url,
        broker_url=broker_url,
        sandbox_options=["--fault-rate", "0.2"],
        extra_env={"ONCELERY_FAST_PATH": str(fast_path).lower()},
    )
    prefix = f"run-{uuid.uuid4().hex[:8]}-"
    events = [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(ORDERS)]

    # When every order is enqueued
    job_ids = system.enqueue(events)
    assert len(set(job_ids)) == ORDERS
    counts = system.wait_finished(prefix, ORDERS)

    # Then every order succeeded, with one charge and one notification each, at the provider
    assert counts[JobState.SUCCEEDED] == ORDERS, counts
    effects = system.effects()
    charges, notifications = per_order(effects, "charge"), per_order(effects, "notification")
    assert charges == {f"{prefix}{n}": 1 for n in range(ORDERS)}
    assert notifications == {f"{prefix}{n}": 1 for n in range(ORDERS)}
    faults = [r for r in system.requests() if r["fault"] == "error"]
    assert len(faults) > ORDERS * 0.1, "the sandbox should really have injected faults"
    audit = system.cli("audit", "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert json.loads(audit.stdout)["clean"] is True

    # When the same events arrive again, nothing new is enqueued or charged
    assert system.enqueue(events[:20]) == job_ids[:20]

    # And when the same order arrives under a new event id, the ledger absorbs it
    again = dict(events[0], event_id=f"{prefix}again")
    [new_job] = system.enqueue([again])
    assert new_job not in job_ids
    system.wait_finished(f"{prefix}again", 1)
    history = json.loads(system.cli("history", new_job, "--json").stdout)
    assert history["state"] == "succeeded"
    assert all(step["deduplicated"] for step in history["steps"])
    assert len(system.effects()) == len(effects)


def test_a_second_pipeline_runs_on_the_same_engine(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    from jobs.engine.enqueue import start_jobs
    from jobs.pipelines import registry
    from jobs.worker import CeleryDispatch, client_app
    from tests.conftest import settings_for
    from tests.toy_pipeline import toy  # noqa: F401 - declares the pipeline

    system = system_factory(database_url=postgres_url, broker_url=redis_url, workers=1)
    settings = settings_for(
        database_url=postgres_url, broker_url=redis_url, data_dir=system.data_dir
    )
    pipeline = registry.get("toy")
    words = ["exactly", "once", "exactly"]
    plans = [
        pipeline.new_job(f"toy-{n}-{uuid.uuid4().hex[:6]}", {"word": w})
        for n, w in enumerate(words)
    ]

    enqueued = start_jobs(
        system.store, CeleryDispatch(sender=client_app(settings)), pipeline, plans
    )
    system.wait_finished("toy-", len(words))

    results = [system.store.get_job(uuid.UUID(e.job_id)).results for e in enqueued]
    assert results[0]["measure"] == {"letters": 7, "upper": "EXACTLY"}
    assert per_order(system.effects(), "notification") == {"toy-exactly": 1, "toy-once": 1}


@pytest.mark.parametrize(
    ("broker", "fast_path"), [("amqp", True), ("redis", False)], ids=["amqp-fast", "redis-chained"]
)
def test_queued_orders_run_in_batches_exactly_once(
    fast_path: bool, broker: str, postgres_url: str, request: pytest.FixtureRequest,
    system_factory: SystemFactory,
) -> None:  # fmt: skip
    # Given orders that queued up before any worker ran, some of them failing once
    system = system_factory(
        database_url=postgres_url,
        broker_url=request.getfixturevalue(f"{broker}_url"),
        workers=0,
        sandbox_options=["--fault-rate", "0.1"],
        extra_env={"ONCELERY_FAST_PATH": str(fast_path).lower(), "ONCELERY_BATCH_SIZE": "8"},
    )
    prefix = f"batch-{uuid.uuid4().hex[:8]}-"
    count = 60
    system.enqueue(
        [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(count)]
    )

    # When one worker takes them
    worker = system.start_worker("batcher")
    counts = system.wait_finished(prefix, count)

    # Then it ran them several at a time (at most 8), and each order was done exactly once
    sizes = [int(m) for m in re.findall(r"batch of (\d+) ", worker.log_path.read_text())]
    assert sizes, "the worker should have run batches"
    assert max(sizes) <= 8
    assert counts[JobState.SUCCEEDED] == count, counts
    effects = system.effects()
    expected = {f"{prefix}{n}": 1 for n in range(count)}
    assert per_order(effects, "charge") == expected
    assert per_order(effects, "notification") == expected
    assert system.cli_json("audit")["clean"]
