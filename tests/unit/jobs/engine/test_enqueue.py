"""`jobs.engine.enqueue`: starting jobs deduplicated by event id, through the order-placed
pipeline's `enqueue_orders`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from uuid import UUID

import pytest

from jobs.engine.enqueue import start_jobs
from jobs.orders import enqueue_orders, parse_events
from jobs.pipelines import Pipeline, Step
from ledger import (
    EventConflict,
    JobState,
    JobStore,
    Reading,
    create_engine,
    first_reading,
    upgrade,
)
from tests.factories import RecordingDispatch, order_event

# --- parse_events: what is accepted ---------------------------------------------------------


# --- enqueue_orders -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    """A job store on a migrated SQLite ledger in the test's folder."""
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    upgrade(engine)
    yield JobStore(engine=engine)
    engine.dispose()


def test_enqueue_creates_a_job_per_event_and_sends_its_first_step(store: JobStore) -> None:
    events = parse_events("\n".join(json.dumps(order_event()) for _ in range(2)))
    dispatch = RecordingDispatch()

    enqueued = enqueue_orders(store, dispatch, events)

    assert [(item.created, item.sent) for item in enqueued] == [(True, True), (True, True)]
    assert dispatch.sent == [("order-placed", "gather", item.job_id) for item in enqueued]
    assert store.count_by_state()[JobState.PENDING] == 2


def test_the_same_event_again_gives_the_same_job_and_sends_nothing(store: JobStore) -> None:
    events = parse_events(json.dumps(order_event()))
    [first] = enqueue_orders(store, RecordingDispatch(), events)
    dispatch = RecordingDispatch()

    [again] = enqueue_orders(store, dispatch, events)

    assert again.job_id == first.job_id
    assert again.created is False
    assert dispatch.sent == []
    assert store.count_by_state()[JobState.PENDING] == 1


def test_an_event_id_seen_before_with_other_content_enqueues_nothing(store: JobStore) -> None:
    """Given an enqueued event, when its id comes again with another amount beside a new event,
    then the call raises naming it, and neither event is enqueued nor sent."""
    event = order_event()
    [first] = enqueue_orders(store, RecordingDispatch(), parse_events(json.dumps(event)))
    changed = {**event, "items": [{"sku": "SKU-9", "quantity": 7}]}
    text = "\n".join(json.dumps(each) for each in (order_event(), changed))
    dispatch = RecordingDispatch()

    with pytest.raises(EventConflict) as raised:
        enqueue_orders(store, dispatch, parse_events(text))

    assert (raised.value.event_id, raised.value.index) == (event["event_id"], 1)
    assert dispatch.sent == []
    assert [job.id for job in store.list_jobs()] == [UUID(first.job_id)]


def test_one_input_with_an_event_twice_and_the_same_content_is_one_job(store: JobStore) -> None:
    event = order_event()
    dispatch = ManyDispatch()

    first, again = enqueue_orders(store, dispatch, parse_events(f"{json.dumps(event)}\n" * 2))

    assert first.job_id == again.job_id
    assert (first.created, again.created) == (True, False)
    job = store.get_job(UUID(first.job_id))
    # The message brings what the row holds, never another line's content.
    [reading] = dispatch.readings.values()
    assert reading.context == job.context


def test_a_lost_publish_leaves_the_job_stored_for_the_sweeper(store: JobStore) -> None:
    events = parse_events(json.dumps(order_event()))

    [item] = enqueue_orders(store, RecordingDispatch(fail=True), events)

    assert (item.created, item.sent) == (True, False)
    assert store.count_by_state()[JobState.PENDING] == 1


class ManyDispatch(RecordingDispatch):
    """Publishes many at once, as `CeleryDispatch` does, recording the readings sent along."""

    def __init__(self) -> None:
        super().__init__()
        self.readings: dict[str, Reading] = {}

    def send_many(
        self,
        pipeline: str,
        step: str,
        job_ids: Sequence[str],
        *,
        readings: Mapping[str, Reading] | None = None,
    ) -> list[str]:
        for job_id in job_ids:
            self.send(pipeline, step, job_id)
        self.readings.update(readings or {})
        return []


def test_a_read_only_first_step_gets_its_reading_in_the_message(store: JobStore) -> None:
    events = parse_events(json.dumps(order_event()))
    dispatch = ManyDispatch()

    [item] = enqueue_orders(store, dispatch, events)

    job = store.get_job(UUID(item.job_id))
    assert dispatch.readings == {
        item.job_id: first_reading(job.id, "gather", job.step_keys["gather"], job.context)
    }
    again = ManyDispatch()
    enqueue_orders(store, again, events)  # seen before: nothing sent, nothing brought
    assert again.readings == {}


def test_a_claimed_first_step_gets_no_reading(store: JobStore) -> None:
    pipeline: Pipeline[object] = Pipeline(
        name="claimed-first",
        steps=[Step("charge", lambda ctx: {}, key="c:{n}")],
        resources=lambda _settings: None,
    )
    dispatch = ManyDispatch()

    start_jobs(store, dispatch, pipeline, [pipeline.new_job("evt-1", {"n": 1})])

    assert len(dispatch.sent) == 1
    assert dispatch.readings == {}
