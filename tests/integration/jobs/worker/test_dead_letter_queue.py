"""RabbitMQ's dead-letter queue, on the real RabbitMQ: bounded when declared, replacing one an
older version declared unbounded, and rid of the copies of purged dead letters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from config import DEAD_EXCHANGE, DEAD_QUEUE, MAIN_QUEUE, dead_letter_queue
from jobs.worker import client_app
from jobs.worker.queues import declare_dead_letter_queue, remove_dead_copies
from ledger import DeadLetter, DeadLetterReason, DeadLetterState
from tests.conftest import POSTGRES_URL, queue_length, settings_for

GATHER, ACT = "oncelery.order-placed.gather", "oncelery.order-placed.act"


@pytest.fixture
def client(amqp_url: str, tmp_path: Path) -> Iterator[Celery]:
    """A Celery app on the test's RabbitMQ (its queues deleted before and after)."""
    settings = settings_for(database_url=POSTGRES_URL, broker_url=amqp_url, data_dir=tmp_path)
    app = client_app(settings)
    with Connection(amqp_url, connect_timeout=5) as conn:
        for queue in app.conf.task_queues:
            queue(conn.channel()).declare()
    yield app
    app.close()


def _reject_into_dead_queue(client: Celery, task: str, **arguments: object) -> str:
    """A step message as RabbitMQ comes to copy it: sent to the main queue (declared with the
    dead-letter exchange), then rejected there without requeueing; its message id."""
    message_id = str(client.send_task(task, **arguments).id)  # type: ignore[arg-type]
    with Connection(client.conf.broker_url, connect_timeout=5) as conn:
        got = Queue(MAIN_QUEUE, channel=conn.channel()).get(no_ack=False)
        assert got is not None
        assert got.headers["id"] == message_id
        got.reject(requeue=False)
    return message_id


def _ids_in_dead_queue(url: str) -> list[str]:
    found = []
    # Every copy read goes back as the channel closes.
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        queue = Queue(DEAD_QUEUE, channel=channel)
        while (message := queue.get(no_ack=False)) is not None:
            found.append(str(message.headers["id"]))
    return found


def _letter(task: str, job_id: str) -> DeadLetter:
    _, pipeline, step = task.split(".")
    now = datetime.now(UTC)
    return DeadLetter(
        id=1,
        job_id=uuid.UUID(job_id),
        pipeline=pipeline,
        step=step,
        key=None,
        state=DeadLetterState.OPEN,
        reason=DeadLetterReason.PERMANENT,
        error_type="PermanentError",
        message="402",
        traceback=None,
        input={},
        attempts=1,
        first_failed_at=now,
        last_failed_at=now,
        closed_at=None,
        closed_by=None,
    )


def test_the_dead_letter_queue_replaces_an_unbounded_one_and_keeps_the_newest(
    client: Celery, amqp_url: str
) -> None:
    # Given the dead-letter queue as an older version declared it (no bound), with copies
    old = Queue(DEAD_QUEUE, Exchange(DEAD_EXCHANGE, type="fanout", durable=True), durable=True)
    with Connection(amqp_url, connect_timeout=5) as conn:
        old(conn.channel()).declare()
    for _ in range(2):
        _reject_into_dead_queue(client, GATHER, args=[str(uuid.uuid4())])
    assert queue_length(amqp_url, DEAD_QUEUE) == 2

    # When a worker declares it bounded (here to 3 copies): no PRECONDITION_FAILED
    bounded = dead_letter_queue(max_length=3)
    declare_dead_letter_queue(client, queue=bounded)
    declare_dead_letter_queue(client, queue=bounded)  # and again: nothing to replace

    # Then it is the bounded queue: of five more rejected messages it keeps the newest three
    assert queue_length(amqp_url, DEAD_QUEUE) == 0
    sent = [_reject_into_dead_queue(client, GATHER, args=[str(uuid.uuid4())]) for _ in range(5)]
    assert _ids_in_dead_queue(amqp_url) == sent[2:]


def test_the_configured_dead_letter_queue_is_accepted_by_rabbitmq(
    client: Celery, amqp_url: str
) -> None:
    declare_dead_letter_queue(client)

    # Redeclaring with the same arguments passes: RabbitMQ holds exactly these.
    with Connection(amqp_url, connect_timeout=5) as conn:
        dead_letter_queue()(conn.channel()).declare()


def test_purging_dead_letters_removes_their_copies_and_keeps_the_others(
    client: Celery, amqp_url: str
) -> None:
    # Given copies of three dead letters, and of a message that named no job at all
    declare_dead_letter_queue(client)
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    gather_one = _reject_into_dead_queue(client, GATHER, args=[one])
    _reject_into_dead_queue(client, ACT, args=[one])
    gather_two = _reject_into_dead_queue(client, GATHER, args=[two])
    malformed = _reject_into_dead_queue(client, GATHER, kwargs={"job_id": one})

    # When the dead letter of job one at act is purged
    removed = remove_dead_copies(client, [_letter(ACT, one)])

    # Then its copy alone is gone, the others keep their order
    assert removed == 1
    assert _ids_in_dead_queue(amqp_url) == [gather_one, gather_two, malformed]

    # And purging everything empties the queue
    assert remove_dead_copies(client, None) == 3
    assert queue_length(amqp_url, DEAD_QUEUE) == 0


def test_other_brokers_keep_no_copies(redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url=POSTGRES_URL, broker_url=redis_url, data_dir=tmp_path)

    assert remove_dead_copies(client_app(settings), None) == 0
