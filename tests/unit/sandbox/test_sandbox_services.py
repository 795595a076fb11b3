"""Each service endpoint's answers over HTTP: happy paths, declined cards, body validation."""

from __future__ import annotations

import pytest

from jobs.sandbox.services import unit_amount
from tests.sandbox_client import SandboxClient


def _charge_body(order_id: str = "o-1", customer_id: str = "c-1") -> dict[str, object]:
    return {"order_id": order_id, "customer_id": customer_id, "amount": 1250, "currency": "EUR"}


def test_healthz(sandbox: SandboxClient) -> None:
    answer = sandbox.get("/healthz")

    assert (answer.status_code, answer.json()) == (200, {"ok": True})


def test_customer_is_synthesised_deterministically(sandbox: SandboxClient) -> None:
    first = sandbox.get("/customers/c-42")
    again = sandbox.get("/customers/c-42")

    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"id", "name", "email", "status"}
    assert (body["id"], body["status"]) == ("c-42", "active")
    assert "@" in body["email"]
    assert again.json() == body


def test_customer_with_declined_prefix_reads_declined(sandbox: SandboxClient) -> None:
    assert sandbox.get("/customers/declined-7").json()["status"] == "declined"


def test_quote_prices_each_line_in_minor_units(sandbox: SandboxClient) -> None:
    body = {
        "currency": "EUR",
        "items": [{"sku": "A-1", "quantity": 2}, {"sku": "B-2", "quantity": 1}],
    }

    answer = sandbox.post("/prices/quote", json=body)

    assert answer.status_code == 200
    a1, b2 = unit_amount("A-1"), unit_amount("B-2")
    assert answer.json() == {
        "currency": "EUR",
        "lines": [
            {"sku": "A-1", "quantity": 2, "unit_amount": a1, "amount": 2 * a1},
            {"sku": "B-2", "quantity": 1, "unit_amount": b2, "amount": b2},
        ],
        "total_amount": 2 * a1 + b2,
    }
    assert all(100 <= unit <= 9999 for unit in (a1, b2))
    assert sandbox.effects() == []


def test_charge_answers_201_and_applies_a_charge(sandbox: SandboxClient) -> None:
    answer = sandbox.post("/payments/charges", json=_charge_body())

    assert answer.status_code == 201
    body = answer.json()
    assert body["id"].startswith("ch_")
    assert {k: v for k, v in body.items() if k != "id"} == {
        "order_id": "o-1",
        "customer_id": "c-1",
        "amount": 1250,
        "currency": "EUR",
        "status": "succeeded",
    }
    [effect] = sandbox.effects()
    assert effect["kind"] == "charge"
    assert (effect["order_id"], effect["amount"], effect["currency"]) == ("o-1", 1250, "EUR")
    assert (effect["service"], effect["idempotency_key"]) == ("payments", None)


def test_declined_customer_gets_402_and_no_charge(sandbox: SandboxClient) -> None:
    answer = sandbox.post("/payments/charges", json=_charge_body(customer_id="declined-1"))

    assert answer.status_code == 402
    assert answer.json()["error"]["type"] == "card_declined"
    assert answer.json()["error"]["message"]
    assert sandbox.effects() == []


def test_notification_answers_201_and_applies_a_notification(sandbox: SandboxClient) -> None:
    body = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "template": "order_confirmed",
        "data": {"n": 1},
    }

    answer = sandbox.post("/notifications", json=body)

    assert answer.status_code == 201
    assert answer.json()["id"].startswith("nt_")
    assert answer.json()["order_id"] == "o-1"
    [effect] = sandbox.effects()
    assert (effect["kind"], effect["order_id"], effect["service"]) == (
        "notification",
        "o-1",
        "notifications",
    )
    assert (effect["amount"], effect["currency"]) == (None, None)


def test_notification_data_is_optional(sandbox: SandboxClient) -> None:
    body = {"order_id": "o-1", "customer_id": "c-1", "template": "t"}

    assert sandbox.post("/notifications", json=body).status_code == 201


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/payments/charges", {**_charge_body(), "amount": 0}, "amount"),
        ("/payments/charges", {**_charge_body(), "amount": "100"}, "amount"),
        ("/payments/charges", {**_charge_body(), "currency": "eur"}, "currency"),
        ("/payments/charges", {**_charge_body(), "tip": 5}, "tip"),
        ("/payments/charges", {"order_id": "o-1"}, "customer_id"),
        ("/prices/quote", {"currency": "EUR", "items": []}, "items"),
        ("/prices/quote", {"currency": "EUR", "items": [{"sku": "A", "quantity": 0}]}, "quantity"),
        ("/notifications", {"order_id": "o-1", "customer_id": "c-1"}, "template"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(
    sandbox: SandboxClient, url: str, body: dict[str, object], field: str
) -> None:
    answer = sandbox.post(url, json=body)

    assert answer.status_code == 422
    assert any(field in error["loc"] for error in answer.json()["detail"])
    assert sandbox.effects() == []


def test_rejected_and_unknown_requests_to_a_service_are_recorded(sandbox: SandboxClient) -> None:
    sandbox.post("/payments/charges", json={"order_id": "o-1"}, headers={"Idempotency-Key": "k"})
    sandbox.get("/payments/nowhere")

    assert [(r["path"], r["status"], r["idempotency_key"]) for r in sandbox.requests()] == [
        ("/payments/charges", 422, "k"),
        ("/payments/nowhere", 404, None),
    ]


def test_sandbox_endpoints_are_not_recorded(sandbox: SandboxClient) -> None:
    sandbox.get("/healthz")
    sandbox.get("/sandbox/faults")
    sandbox.get("/sandbox/nowhere")

    assert sandbox.requests() == []


def test_an_unavailable_processor_answers_503_and_keeps_no_answer(sandbox: SandboxClient) -> None:
    client = sandbox
    body = _charge_body("o-u", "unavailable-1")

    first = client.post("/payments/charges", json=body, headers={"Idempotency-Key": "k-u"})
    second = client.post("/payments/charges", json=body, headers={"Idempotency-Key": "k-u"})

    assert (first.status_code, second.status_code) == (503, 503)
    assert first.json()["error"]["type"] == "processor_unavailable"
    assert client.effects() == []
