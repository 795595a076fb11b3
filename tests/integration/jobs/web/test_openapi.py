"""The API against its own OpenAPI schema: schemathesis generates requests for every operation
(valid and invalid, signed where the schema asks for a signature) and runs every check it has
on the answers, in process (ASGI), on a fresh Postgres database and Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks

from jobs.ops.signatures import sign
from jobs.web.api_schema import (
    SIGNATURE_HEADER,
    SIGNATURE_PATTERN,
    TIMESTAMP_HEADER,
    TIMESTAMP_PATTERN,
)
from jobs.web.intake import create_app
from tests.conftest import settings_for
from tests.integration.jobs.web.test_intake import Client

SECRET = "whsec-openapi-test-0123"
TOKEN = "token-openapi-test-0123"
#: Examples per operation: enough to reach each documented status, within CI's budget.
EXAMPLES = 20


class SignWellFormed(requests.auth.AuthBase):
    """Signs a request whose signature headers look right (as the schema describes them) with
    the real secret, over the exact bytes sent: what a sender does. Malformed or missing
    headers are left as generated, so the server's refusal of them is tested too."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        stamp = request.headers.get(TIMESTAMP_HEADER)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not isinstance(stamp, str) or not isinstance(signature, str):
            return request
        if re.fullmatch(TIMESTAMP_PATTERN, stamp) and re.fullmatch(SIGNATURE_PATTERN, signature):
            body = request.body or b""
            assert isinstance(body, str | bytes), type(body)
            raw = body.encode() if isinstance(body, str) else body
            now = str(int(time.time()))
            request.headers[TIMESTAMP_HEADER] = now
            request.headers[SIGNATURE_HEADER] = sign(SECRET, now, raw)
        return request


@pytest.fixture
def api_schema(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Any]:
    configured = settings_for(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        WEBHOOK_SECRET=SECRET,
        API_TOKEN=TOKEN,
    )
    app = create_app(configured)
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield loaded
    app.state.intake.runtime.close()


def test_the_schema_describes_the_api(api_schema: Any) -> None:
    raw = api_schema.raw_schema
    paths, components = raw["paths"], raw["components"]

    # The bearer token, on every operation behind it
    assert components["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <API_TOKEN>`",
    }
    assert paths["/jobs"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/healthz"]["get"]
    # The webhook of each pipeline, its event's schema and its signature headers
    webhook = paths["/webhooks/order-placed"]["post"]
    headers = {p["name"] for p in webhook["parameters"] if p["in"] == "header"}
    assert headers == {TIMESTAMP_HEADER, SIGNATURE_HEADER}
    body = webhook["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"][:2] == ["event_id", "order_id"]
    assert body["additionalProperties"] is False
    assert "/webhooks/{pipeline}" not in paths
    # One error shape, for every error status
    for path, operations in paths.items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/healthz":
                    shape = answer["content"]["application/json"]["schema"]
                    assert shape == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)
    # No page for people
    assert not any(path == "/" or path.startswith(("/ui", "/login")) for path in paths)


def test_docs_are_served(api_schema: Any) -> None:
    client = Client(api_schema.app)
    try:
        docs = client.request("GET", "/docs")
    finally:
        client.close()

    assert docs.status_code == 200
    assert "/openapi.json" in docs.text
    # Pinned, checked by hash, and unable to send what it reads anywhere but here
    assert docs.text.count('integrity="sha384-') == 2
    assert "@5.36.0/" in docs.text
    assert "connect-src 'self'" in docs.headers["content-security-policy"]


#: The webhooks of the shipped pipelines; those other tests of the process declared (whose
#: events' key fields `tests/unit/jobs/test_events.py` covers) would only add time.
SHIPPED = ("order-placed", "order-fulfilment", "places-crawl")
schema = schemathesis.pytest.from_fixture("api_schema").exclude(
    path_regex=r"^/webhooks/(?!(" + "|".join(SHIPPED) + r")$)"
)
load_all_checks()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_api_keeps_its_schema(case: Any) -> None:
    session = requests.Session()
    session.auth = SignWellFormed()
    case.call_and_validate(
        session=session,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=CHECKS.get_all(),
    )
