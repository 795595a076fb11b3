"""`POST /signals/{name}`, signed like the webhook: 202 recorded, 200 duplicate, 409 the same
id with other content (nothing written), 401 unsigned or badly signed, 422 naming the field."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from jobs.ops.signatures import sign
from jobs.web.intake import create_app
from ledger.schema import signals
from tests.conftest import settings_for
from tests.integration.jobs.web.test_intake import SECRET, TOKEN, Client


@pytest.fixture
def intake(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Client, Any]]:
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
    yield client, app.state.intake
    client.close()
    app.state.intake.runtime.close()


def post_signal(
    client: Client, name: str, body: object, *, secret: str = SECRET, raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    stamp = str(int(time.time()))
    headers = {
        "X-Oncelery-Timestamp": stamp,
        "X-Oncelery-Signature": sign(secret, stamp, content),
        "Content-Type": "application/json",
    }
    return client.request("POST", f"/signals/{name}", content=content, headers=headers)


def kept(intake: Any) -> int:
    with intake.runtime.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(signals)).scalar_one())


def test_a_signal_is_recorded_once_and_a_conflict_writes_nothing(
    intake: tuple[Client, Any],
) -> None:
    client, state = intake
    body = {"key": "order-1", "signal_id": f"s-{uuid.uuid4()}", "data": {"carrier": "DHL"}}

    first = post_signal(client, "shipped", body)
    again = post_signal(client, "shipped", body)
    conflict = post_signal(client, "shipped", {**body, "data": {"carrier": "UPS"}})

    assert (first.status_code, again.status_code, conflict.status_code) == (202, 200, 409)
    assert first.json() == {"outcome": "recorded", "signal_id": body["signal_id"], "woke": None}
    assert again.json()["outcome"] == "duplicate"
    assert conflict.json()["error"]["field"] == "signal_id"
    assert kept(state) == 1


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("shipped", {"signal_id": "s-1"}, "key"),
        ("shipped", {"key": "", "signal_id": "s-1"}, "key"),
        ("shipped", {"key": "o-1", "signal_id": 7}, "signal_id"),
        ("shipped", {"key": "o-1", "signal_id": "s-1", "colour": "red"}, "colour"),
        ("shipped", {"key": "o-1", "signal_id": "s-1", "data": "x" * 20_000}, "data"),
        ("ship ped", {"key": "o-1", "signal_id": "s-1"}, "name"),
        ("shipped", ["key", "o-1"], ""),
    ],
)
def test_a_bad_signal_is_422_naming_the_field_and_writes_nothing(
    intake: tuple[Client, Any], name: str, body: object, field: str
) -> None:
    client, state = intake

    answer = post_signal(client, name, body)

    assert answer.status_code == 422, answer.text
    assert [problem["field"] for problem in answer.json()["error"]["fields"]][:1] == [field]
    assert kept(state) == 0


def test_a_signal_not_signed_with_the_secret_is_401(intake: tuple[Client, Any]) -> None:
    client, state = intake
    body = {"key": "order-1", "signal_id": "s-1"}

    answers = [
        post_signal(client, "shipped", body, secret="not-the-secret-at-all"),
        client.request("POST", "/signals/shipped", content=json.dumps(body).encode()),
    ]

    assert [answer.status_code for answer in answers] == [401, 401]
    assert post_signal(client, "shipped", {}, raw=b"{not json").status_code == 422
    assert kept(state) == 0
