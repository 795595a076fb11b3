"""The HTTP intake in process (no socket) on real Postgres and Redis: the signed webhook, the
read API behind its token, and a fuzzed webhook that never answers 5xx."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.ops.signatures import sign
from jobs.web.http import MAX_BODY_BYTES
from jobs.web.intake import create_app
from ledger import JobState
from tests.conftest import settings_for
from tests.factories import order_event

SECRET = "whsec-integration-test"
TOKEN = "token-integration-test"


class Client:
    """A synchronous client for an ASGI app, on one event loop."""

    def __init__(self, app: Any) -> None:
        self.runner = asyncio.Runner()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://intake"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.client.request(method, url, **kwargs))

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()


@pytest.fixture
def intake(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Client, Any]]:
    configured = settings_for(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        WEBHOOK_SECRET=SECRET,
        API_TOKEN=TOKEN,
    )
    app = create_app(configured)
    client = Client(app)
    yield client, app.state.intake
    client.close()
    app.state.intake.runtime.close()


def post_event(
    client: Client,
    body: bytes,
    *,
    timestamp: int | None = None,
    secret: str = SECRET,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    stamp = str(timestamp if timestamp is not None else int(time.time()))
    signed = {
        "X-Oncelery-Timestamp": stamp,
        "X-Oncelery-Signature": sign(secret, stamp, body),
        "Content-Type": "application/json",
    }
    return client.request(
        "POST", "/webhooks/order-placed", content=body, headers={**signed, **(headers or {})}
    )


def encode(event: Mapping[str, object]) -> bytes:
    return json.dumps(event).encode()


def test_a_signed_order_is_accepted_once(intake: tuple[Client, Any]) -> None:
    client, state = intake
    body = encode(order_event())

    first = post_event(client, body)
    again = post_event(client, body)

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == first.json()
    job = state.runtime.store.get_job(uuid.UUID(first.json()["job_id"]))
    assert job.state is JobState.PENDING


def test_an_event_id_with_other_content_is_a_409_naming_it(intake: tuple[Client, Any]) -> None:
    """The same event id must mean the same event: another content under it is refused, not
    silently answered with the first event's job."""
    client, state = intake
    event = order_event()
    first = post_event(client, encode(event))
    changed = post_event(client, encode({**event, "items": [{"sku": "SKU-9", "quantity": 9}]}))

    assert first.status_code == 202
    assert changed.status_code == 409
    error = changed.json()["error"]
    assert (error["type"], error["field"], error["event_id"]) == (
        "conflict",
        "event_id",
        event["event_id"],
    )
    assert [job.id for job in state.runtime.store.list_jobs()] == [
        uuid.UUID(first.json()["job_id"])
    ]


# The age, not the timestamp, is the parameter: a timestamp in a test's id would differ between
# two xdist processes collecting on either side of a second, and xdist refuses to start.
@pytest.mark.parametrize(
    ("headers", "age", "secret", "message"),
    [
        ({"X-Oncelery-Signature": "sha256=00"}, None, SECRET, "does not match"),
        ({}, None, "another-secret", "does not match"),
        ({}, 3600, SECRET, "too old"),
        ({"X-Oncelery-Timestamp": "yesterday"}, None, SECRET, "unix seconds"),
    ],
)
def test_a_bad_signature_is_refused(
    intake: tuple[Client, Any],
    headers: dict[str, str],
    age: int | None,
    secret: str,
    message: str,
) -> None:
    client, _ = intake
    timestamp = None if age is None else int(time.time()) - age
    answer = post_event(
        client, encode(order_event()), timestamp=timestamp, secret=secret, headers=headers
    )
    assert answer.status_code == 401
    assert message in answer.json()["error"]["message"]


#: Header values no sender should produce: thousands of digits (past `int`'s 4,300-digit
#: limit), hundreds (past a float), padded, signed, or digits that are not ASCII.
_ABSURD_STAMPS = ["9" * 5000, "1" * 400, "0" * 5000 + "1700000000", "-1700000000", "+17", "¹²³"]


@pytest.mark.parametrize(
    "stamp", _ABSURD_STAMPS, ids=["5000-digits", "400-digits", "padded", "negative", "plus", "sup"]
)
def test_an_absurd_timestamp_is_a_401_naming_the_header(
    intake: tuple[Client, Any], stamp: str
) -> None:
    client, _ = intake
    body = encode(order_event())
    signature = sign(SECRET, stamp, body)
    signed = {
        b"X-Oncelery-Timestamp": stamp.encode("latin-1"),
        b"X-Oncelery-Signature": signature.encode(),
    }

    answer = client.request("POST", "/webhooks/order-placed", content=body, headers=signed)

    assert answer.status_code == 401
    assert "X-Oncelery-Timestamp" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("length", "status"),
    [("9" * 5000, 413), ("99999999999999999999", 413), ("²", 400), ("1e3", 400), ("-1", 400)],
    ids=["5000-digits", "20-digits", "superscript", "float", "negative"],
)
def test_an_absurd_content_length_is_a_4xx_naming_the_header(
    intake: tuple[Client, Any], length: str, status: int
) -> None:
    client, _ = intake
    body = encode(order_event())
    stamp = str(int(time.time()))
    headers = {
        b"Content-Length": length.encode("latin-1"),
        b"X-Oncelery-Timestamp": stamp.encode(),
        b"X-Oncelery-Signature": sign(SECRET, stamp, body).encode(),
    }

    answer = client.request("POST", "/webhooks/order-placed", content=body, headers=headers)

    assert answer.status_code == status
    assert answer.json()["error"]["type"] in ("bad_request", "too_large")


def test_missing_signature_headers_are_refused(intake: tuple[Client, Any]) -> None:
    client, _ = intake
    answer = client.request("POST", "/webhooks/order-placed", content=encode(order_event()))
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "unauthorized"


def test_an_invalid_body_names_its_fields(intake: tuple[Client, Any]) -> None:
    client, _ = intake
    event = order_event(currency="eur", colour="red")
    answer = post_event(client, encode(event))
    assert answer.status_code == 422
    fields = {field["field"] for field in answer.json()["error"]["fields"]}
    assert fields == {"currency", "colour"}
    assert post_event(client, b"{not json").status_code == 422
    assert post_event(client, b"[1, 2]").status_code == 422


def test_an_oversized_body_is_refused(intake: tuple[Client, Any]) -> None:
    client, _ = intake
    answer = post_event(client, b" " * (MAX_BODY_BYTES + 1))
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "too_large"


def test_the_read_api_needs_the_token(intake: tuple[Client, Any]) -> None:
    client, _ = intake
    job_id = post_event(client, encode(order_event())).json()["job_id"]
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    for path in (f"/jobs/{job_id}", "/jobs", "/dead-letters", "/metrics"):
        assert client.request("GET", path).status_code == 401, path
        assert (
            client.request("GET", path, headers={"Authorization": "Bearer nope"}).status_code == 401
        )
    job = client.request("GET", f"/jobs/{job_id}", headers=bearer).json()
    assert (job["state"], [s["name"] for s in job["steps"]]) == (
        "pending",
        ["gather", "act", "publish"],
    )
    listed = client.request("GET", "/jobs", params={"state": "pending"}, headers=bearer).json()[
        "jobs"
    ]
    assert [j["job_id"] for j in listed] == [job_id]
    assert (
        client.request("GET", "/jobs", params={"state": "bogus"}, headers=bearer).status_code == 422
    )
    assert client.request("GET", "/jobs/not-a-uuid", headers=bearer).status_code == 422
    assert (
        client.request(
            "GET", f"/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=bearer
        ).status_code
        == 404
    )
    assert client.request("GET", "/dead-letters", headers=bearer).json() == {"dead_letters": []}
    assert client.request("POST", "/dead-letters/1/replay", headers=bearer).status_code == 404
    metrics = client.request("GET", "/metrics", headers=bearer).text
    assert 'oncelery_jobs{state="pending"} 1.0' in metrics
    for name in (
        "oncelery_queue_depth",
        "oncelery_oldest_pending_job_age_seconds",
        "oncelery_schedule_to_start_seconds_bucket",
        "oncelery_duplicates_absorbed_total",
        "oncelery_dead_letters_open",
        "oncelery_step_retries_total",
    ):
        assert name in metrics, name
    health = client.request("GET", "/healthz")
    assert (health.status_code, health.json()) == (200, {"database": "ok", "broker": "ok"})


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_field_values = st.one_of(_json_values, st.just("EUR"), st.just([{"sku": "A", "quantity": 1}]))
_events = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(
        ("event_id", "order_id", "customer_id", "currency", "items", "extra"), _field_values
    ),
)
_bodies = st.one_of(
    _events.map(lambda e: json.dumps(e).encode()),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=_bodies,
    signed=st.booleans(),
    skew=st.sampled_from([0, 10, 10_000]),
    junk=st.dictionaries(
        st.sampled_from(["X-Oncelery-Signature", "X-Oncelery-Timestamp", "Content-Type"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
        | st.text(alphabet="0123456789", min_size=11, max_size=5000),
        max_size=2,
    ),
)
def test_fuzzed_webhooks_get_4xx_or_2xx_and_never_an_invalid_order(
    intake: tuple[Client, Any], body: bytes, signed: bool, skew: int, junk: dict[str, str]
) -> None:
    client, state = intake
    if signed:
        answer = post_event(client, body, timestamp=int(time.time()) - skew, headers=junk)
    else:
        answer = client.request("POST", "/webhooks/order-placed", content=body, headers=junk)
    assert answer.status_code < 500
    assert "error" in answer.json() or "job_id" in answer.json()
    if answer.status_code in (200, 202):
        job = state.runtime.store.get_job(uuid.UUID(answer.json()["job_id"]))
        assert job.context["currency"].isupper()
