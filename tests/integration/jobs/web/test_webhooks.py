"""`POST /webhooks/{pipeline}` for a pipeline of one's own (`toy-typed`): the order-placed
scheme — 202 new, 200 seen, 409 conflict, 422 naming fields, 401 unsigned — and 404 JSON
naming a pipeline nobody declared."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.ops.signatures import sign
from jobs.web.intake import create_app
from tests.conftest import settings_for
from tests.integration.jobs.web.test_intake import SECRET, TOKEN, Client


@pytest.fixture
def client(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Client]:
    configured = settings_for(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        WEBHOOK_SECRET=SECRET,
        API_TOKEN=TOKEN,
        pipelines="tests.toy_pipeline",
    )
    app = create_app(configured)
    client = Client(app)
    yield client
    client.close()
    app.state.intake.runtime.close()


def post(client: Client, pipeline: str, event: dict[str, Any], *, signed: bool = True) -> Any:
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    headers = {"X-Oncelery-Timestamp": stamp, "Content-Type": "application/json"}
    if signed:
        headers["X-Oncelery-Signature"] = sign(SECRET, stamp, body)
    answer: httpx.Response = client.request(
        "POST", f"/webhooks/{pipeline}", content=body, headers=headers
    )
    return answer


def test_any_pipeline_takes_signed_events_once(client: Client) -> None:
    event = {"event_id": f"w-{uuid.uuid4()}", "word": "hello"}

    first = post(client, "toy-typed", event)
    again = post(client, "toy-typed", event)
    other = post(client, "toy-typed", {**event, "word": "other"})

    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409)
    assert again.json() == first.json()
    assert other.json()["error"]["event_id"] == event["event_id"]
    job = client.request(
        "GET", f"/jobs/{first.json()['job_id']}", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    assert (job["pipeline"], job["state"]) == ("toy-typed", "pending")


def test_an_invalid_event_names_its_fields(client: Client) -> None:
    answer = post(client, "toy-typed", {"event_id": "w-1", "word": "hi", "times": "2", "x": 1})

    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["message"] == "times: Input should be a valid integer (and 1 more problem)"
    assert [field["field"] for field in error["fields"]] == ["times", "x"]


def test_an_unknown_pipeline_is_a_404_naming_it_once_signed(client: Client) -> None:
    answer = post(client, "nope", {"event_id": "w-1"})
    unsigned = post(client, "nope", {"event_id": "w-1"}, signed=False)

    assert answer.status_code == 404
    assert answer.json()["error"]["pipeline"] == "nope"
    assert "'nope'" in answer.json()["error"]["message"]
    assert unsigned.status_code == 401


def test_the_shipped_places_crawl_takes_signed_events_and_names_a_bad_field(
    client: Client,
) -> None:
    crawl = {
        "event_id": f"c-{uuid.uuid4()}",
        "crawl_id": "village-1",
        "lat": 48.5868,
        "lng": 2.1891,
        "radius_m": 3000,
        "categories": ["hotel", "museum"],
    }

    first = post(client, "places-crawl", crawl)
    bad = post(client, "places-crawl", {**crawl, "event_id": "c-bad", "categories": []})

    assert first.status_code == 202
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith("categories: List should have at least 1 item")
