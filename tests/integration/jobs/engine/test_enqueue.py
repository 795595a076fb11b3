"""The intake's outbox relay on real Postgres and RabbitMQ: the jobs the intake accepted go to
the broker together and leave the outbox; with the broker unreachable they stay in it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import MAIN_QUEUE
from jobs.engine.enqueue import OutboxRelay
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.orders import order_job
from jobs.tools.bench import sql
from jobs.worker import CeleryDispatch, client_app
from tests.conftest import purge_queues, queue_length, settings_for
from tests.factories import order
from tests.waiting import wait_for


def relay_for(runtime: Runtime, broker_url: str, tmp_path: Path) -> OutboxRelay:
    settings = settings_for(database_url="sqlite://", broker_url=broker_url, data_dir=tmp_path)
    dispatch = CeleryDispatch(sender=client_app(settings), settings=settings)
    return OutboxRelay(runtime, dispatch, lambda _pipeline: "gather")


@pytest.fixture
def runtime(postgres_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = settings_for(database_url=postgres_url, broker_url=None, data_dir=tmp_path)
    load_pipelines(settings)
    rt = Runtime.from_settings(settings)
    yield rt
    rt.close()


def in_outbox(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(sql.count_undispatched()).scalar_one())


def accept(runtime: Runtime, relay: OutboxRelay, count: int) -> None:
    jobs = [order_job(order(event_id=f"relay-{n}", order_id=f"relay-{n}")) for n in range(count)]
    for job_id, created in runtime.store.create_jobs(jobs):
        assert created
        relay.accepted("order-placed", job_id)


def test_accepted_jobs_go_to_the_broker_and_leave_the_outbox(
    runtime: Runtime, amqp_url: str, tmp_path: Path
) -> None:
    purge_queues(amqp_url)
    relay = relay_for(runtime, amqp_url, tmp_path)
    accept(runtime, relay, 60)

    relay.start()
    try:
        wait_for(lambda: in_outbox(runtime) == 0, "the outbox to empty", timeout=30, interval=0.05)
    finally:
        relay.stop()

    assert in_outbox(runtime) == 0
    assert queue_length(amqp_url, MAIN_QUEUE) == 60


def test_with_the_broker_unreachable_accepted_jobs_stay_in_the_outbox(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay = relay_for(runtime, "amqp://guest:guest@127.0.0.1:1//", tmp_path)
    accept(runtime, relay, 5)

    with caplog.at_level(logging.WARNING, logger="jobs"):
        relay.start()
        try:
            wait_for(
                lambda: "wait in the outbox" in caplog.text,
                "the relay to report its failed sends",
                timeout=60,
                interval=0.05,
            )
        finally:
            relay.stop()

    assert "wait in the outbox" in caplog.text
    assert in_outbox(runtime) == 5
