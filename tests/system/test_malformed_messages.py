"""Step messages that cannot be run, sent to a real worker on RabbitMQ and on Redis: each
is rejected (or, naming no job, acknowledged) once, logged once and counted, never looped,
and the worker goes on with good messages."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import DEAD_QUEUE, MAIN_QUEUE, RETRY_QUEUE
from jobs.engine.runtime import Runtime
from jobs.ops.metrics import render_metrics
from jobs.worker import client_app
from ledger import JobState
from tests.conftest import queue_length, settings_for
from tests.factories import order_event
from tests.system.conftest import SystemFactory
from tests.waiting import wait_for

pytestmark = pytest.mark.system

GATHER = "oncelery.order-placed.gather"


@pytest.fixture(params=["amqp", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each real broker."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def _received(log: str, task_id: str) -> int:
    """How many times the worker took the message (Celery logs each delivery)."""
    return log.count(f"Task {GATHER}[{task_id}] received")


def test_a_malformed_step_message_is_rejected_once_logged_and_counted(
    postgres_url: str, broker_url: str, system_factory: SystemFactory, tmp_path: Path
) -> None:
    # Given a queue that holds, before any worker runs, good orders and, between them, step
    # messages that cannot be run — sent as the README's "each step is a Celery task"
    # invites: keyword arguments, a job id that is not a UUID, a UUID of no job
    system = system_factory(database_url=postgres_url, broker_url=broker_url, workers=0)
    settings = settings_for(
        database_url=postgres_url, broker_url=broker_url, data_dir=tmp_path / "client"
    )
    client = client_app(settings)
    prefix = f"malformed-{uuid.uuid4().hex[:8]}-"

    def orders(*numbers: int) -> None:
        system.enqueue(
            [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in numbers]
        )

    orders(0, 1)
    keywords = client.send_task(GATHER, kwargs={"job_id": str(uuid.uuid4())}).id
    orders(2, 3)
    not_uuid = client.send_task(GATHER, args=["not-a-uuid"]).id
    stranger = str(uuid.uuid4())
    no_job = client.send_task(GATHER, args=[stranger]).id
    orders(4, 5)

    # When one worker with one child takes them (all but the first wait, and go in batches)
    worker = system.start_worker("worker", concurrency=1)

    # Then the good orders are done, and each bad message was delivered and logged once
    assert system.wait_finished(prefix, 6, timeout=60)[JobState.SUCCEEDED] == 6
    wanted = [
        f"rejected step message {keywords} of {GATHER}: ",
        f"rejected step message {not_uuid} of {GATHER}: ",
        f"step message of {GATHER} names no job: {stranger}",
    ]

    def logged() -> bool:
        return all(line in worker.log_path.read_text() for line in wanted)

    def not_rejected() -> str:
        log = worker.log_path.read_text()
        deliveries = {i: _received(log, i) for i in (keywords, not_uuid, no_job)}
        return (
            f"each bad message to be rejected: deliveries by message {deliveries}, "
            f"{log.count(chr(10))} log lines; see {worker.log_path}"
        )

    wait_for(logged, not_rejected, timeout=20)
    log = worker.log_path.read_text()
    assert [_received(log, i) for i in (keywords, not_uuid, no_job)] == [1, 1, 1]
    assert [log.count(line) for line in wanted] == [1, 1, 1]
    assert "keyword arguments ['job_id']" in log
    assert "job id 'not-a-uuid' is not a UUID" in log
    # (the messages that waited went to the child together, the bad with the good)
    assert re.search(rf"batch of [2-9] {GATHER} messages", log), "no batch formed"

    # And nothing waits to come back; RabbitMQ keeps the two rejected messages' copies
    assert queue_length(broker_url, MAIN_QUEUE) == queue_length(broker_url, RETRY_QUEUE) == 0
    if broker_url.startswith("amqp"):
        assert queue_length(broker_url, DEAD_QUEUE) == 2

    # And the metric counts each, by step task and reason
    rt = Runtime.from_settings(settings)
    try:
        text = render_metrics(rt, client)[0].decode()
    finally:
        rt.close()
    counted = {
        (sample.labels["task"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "oncelery_malformed_messages"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {
        (GATHER, "arguments"): 1.0,
        (GATHER, "job_id"): 1.0,
        (GATHER, "no_such_job"): 1.0,
    }
