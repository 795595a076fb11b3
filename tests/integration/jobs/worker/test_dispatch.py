"""Publishing many jobs' first steps at once (`CeleryDispatch.send_many`) on the real brokers:
RabbitMQ's publisher confirms awaited together, Redis as is, an unreachable broker."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from kombu import Connection

from config import MAIN_QUEUE
from jobs.engine.dispatch import READING_HEADER, message_reading
from jobs.engine.runtime import load_pipelines
from jobs.worker import CeleryDispatch, client_app
from jobs.worker.publishing import Confirms
from jobs.worker.time_limits import FAN_OUT_ALLOWANCE
from ledger import first_reading
from tests.conftest import declare_queues, purge_queues, queue_length, settings_for


@pytest.fixture(params=["amqp", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def _dispatch(broker_url: str, tmp_path: Path, *, task_events: bool = False) -> CeleryDispatch:
    settings = settings_for(
        database_url="sqlite://",
        broker_url=broker_url,
        data_dir=tmp_path,
        ONCELERY_TASK_EVENTS=str(task_events).lower(),
    )
    return CeleryDispatch(sender=client_app(settings), settings=settings)


@pytest.mark.parametrize("task_events", [False, True])
def test_every_job_of_a_batch_is_queued_once(
    broker_url: str, task_events: bool, tmp_path: Path
) -> None:
    """With task events on, each task message is followed by a `task-sent` event: both are
    confirmed before a job counts as sent."""
    purge_queues(broker_url)
    job_ids = [str(uuid.uuid4()) for _ in range(120)]
    try:
        dispatch = _dispatch(broker_url, tmp_path, task_events=task_events)
        unsent = dispatch.send_many("order-placed", "gather", job_ids)

        assert unsent == []
        assert queue_length(broker_url, MAIN_QUEUE) == len(job_ids)
    finally:
        purge_queues(broker_url)


def test_a_reading_travels_in_its_message_header(broker_url: str, tmp_path: Path) -> None:
    purge_queues(broker_url)
    job_id = str(uuid.uuid4())
    reading = first_reading(uuid.UUID(job_id), "gather", "k:1", {"items": [{"sku": "a", "n": 2}]})
    try:
        dispatch = _dispatch(broker_url, tmp_path)
        assert (
            dispatch.send_many("order-placed", "gather", [job_id], readings={job_id: reading}) == []
        )

        message = _first_message(broker_url)
        assert message_reading(message.headers[READING_HEADER], job_id, "gather") == reading
    finally:
        purge_queues(broker_url)


def _first_message(broker_url: str) -> Any:
    with Connection(broker_url, connect_timeout=5) as conn:
        # kombu's stubs leave out the transport channels' `basic_get`.
        channel: Any = conn.default_channel
        return channel.message_to_python(channel.basic_get(MAIN_QUEUE, no_ack=True))


def test_a_batch_message_is_the_one_send_task_would_publish(
    broker_url: str, tmp_path: Path
) -> None:
    """`send_many` builds its messages with Celery's own two calls rather than `send_task`:
    what a worker (or Flower) reads off them must not differ."""
    purge_queues(broker_url)
    job_id = str(uuid.uuid4())
    try:
        dispatch = _dispatch(broker_url, tmp_path)
        assert dispatch.send_many("order-placed", "gather", [job_id]) == []
        batched = _first_message(broker_url)
        dispatch.send("order-placed", "gather", job_id)
        alone = _first_message(broker_url)
    finally:
        purge_queues(broker_url)

    assert batched.decode() == alone.decode() == [[job_id], {}, ANY]
    differ = {"id", "root_id"}  # each message is a task of its own
    assert {k: v for k, v in batched.headers.items() if k not in differ} == {
        k: v for k, v in alone.headers.items() if k not in differ
    }
    assert batched.headers["root_id"] == batched.headers["id"] != alone.headers["id"]
    assert batched.properties["correlation_id"] == batched.headers["id"]
    for name in ("reply_to", "delivery_mode", "priority"):
        assert batched.properties.get(name) == alone.properties.get(name)
    assert batched.content_type == alone.content_type == "application/json"


@pytest.mark.parametrize(
    "unreachable", ["amqp://guest:guest@127.0.0.1:1//", "redis://127.0.0.1:1/0"]
)
def test_an_unreachable_broker_leaves_every_job_unsent(unreachable: str, tmp_path: Path) -> None:
    # (On Redis the lot is one pipeline, sent at the end: its failure leaves all unsent.)
    dispatch = _dispatch(unreachable, tmp_path)
    job_ids = [str(uuid.uuid4()) for _ in range(3)]

    assert dispatch.send_many("order-placed", "gather", job_ids) == job_ids


def test_confirms_count_single_and_multiple_answers() -> None:
    confirms = Confirms()
    confirms.sent_by = {1: "a", 2: "a", 3: "b", 4: "c", 5: "d", 6: "e", 7: "e", 8: "f"}
    confirms.published = 8
    confirms._on_ack(2, False)
    confirms._on_ack(4, True)  # 1, 3 and 4
    confirms._on_nack(5, False)
    confirms._on_ack(7, True)  # 6 and 7

    assert confirms.acked == {1, 2, 3, 4, 6, 7}
    assert confirms.nacked == {5}
    # d was refused, f has no answer yet
    assert confirms.unconfirmed() == {"d", "f"}


def test_a_map_steps_own_message_allows_for_its_fan_out_and_its_items_messages_do_not(
    broker_url: str, tmp_path: Path
) -> None:
    """A map step's message records and publishes its items after its run: a limit of the
    step's own seconds struck there (100,000 items on a loaded box), leaving the rest to the
    sweeper. Its run keeps its own limit from an alarm; its items keep theirs."""
    purge_queues(broker_url)
    job_id = str(uuid.uuid4())
    try:
        dispatch = _dispatch(broker_url, tmp_path)
        assert dispatch.settings is not None
        load_pipelines(dispatch.settings)
        declare_queues(dispatch.settings)
        dispatch.send("places-crawl", "search", job_id)
        _, own = _first_message(broker_url).headers["timelimit"]
        dispatch.send("places-crawl", "plan", job_id)
        _, plain = _first_message(broker_url).headers["timelimit"]
        assert dispatch.send_items("places-crawl", "search", job_id, ["c1", "c2"]) == []
        _, items = _first_message(broker_url).headers["timelimit"]

        assert own >= FAN_OUT_ALLOWANCE > plain
        assert items < FAN_OUT_ALLOWANCE

        # On the fast path, a message of the step before runs the map step too
        settings = settings_for(
            database_url="sqlite://",
            broker_url=broker_url,
            data_dir=tmp_path,
            fast_path=True,
        )
        fast = CeleryDispatch(sender=client_app(settings), settings=settings)
        fast.send("places-crawl", "plan", job_id)
        _, before_the_map = _first_message(broker_url).headers["timelimit"]
        assert before_the_map >= FAN_OUT_ALLOWANCE
    finally:
        purge_queues(broker_url)
