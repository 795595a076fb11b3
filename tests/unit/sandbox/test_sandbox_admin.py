"""The sandbox's own endpoints: fault control, effect and request reports, reset."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobs.sandbox import Faults
from tests.sandbox_client import SandboxClient

NO_FAULTS = {
    "fault_rate": 0.0,
    "timeout_rate": 0.0,
    "lost_reply_rate": 0.0,
    "rate_limited_rate": 0.0,
    "retry_after_seconds": 1,
    "latency_ms": 0,
}


def _charge(sandbox: SandboxClient, order_id: str, key: str) -> None:
    body = {"order_id": order_id, "customer_id": "c-1", "amount": 500, "currency": "EUR"}
    answer = sandbox.post("/payments/charges", json=body, headers={"Idempotency-Key": key})
    assert answer.status_code == 201, answer.text


def _notify(sandbox: SandboxClient, order_id: str, key: str) -> None:
    body = {"order_id": order_id, "customer_id": "c-1", "template": "t"}
    answer = sandbox.post("/notifications", json=body, headers={"Idempotency-Key": key})
    assert answer.status_code == 201, answer.text


def test_get_faults_reports_start_settings(make_sandbox: Callable[..., SandboxClient]) -> None:
    sandbox = make_sandbox(Faults(fault_rate=0.25, latency_ms=3), honour_keys=False)

    answer = sandbox.get("/sandbox/faults")

    assert answer.json() == {
        "global": {**NO_FAULTS, "fault_rate": 0.25, "latency_ms": 3},
        "services": {},
        "honour_keys": False,
    }


def test_post_faults_sets_global_then_service_and_answers_like_get(sandbox: SandboxClient) -> None:
    sandbox.post("/sandbox/faults", json={"fault_rate": 0.1, "latency_ms": 2})

    answer = sandbox.post("/sandbox/faults", json={"service": "payments", "timeout_rate": 0.5})

    expected = {
        "global": {**NO_FAULTS, "fault_rate": 0.1, "latency_ms": 2},
        "services": {"payments": {**NO_FAULTS, "timeout_rate": 0.5}},
        "honour_keys": True,
    }
    assert (answer.status_code, answer.json()) == (200, expected)
    assert sandbox.get("/sandbox/faults").json() == expected


def test_post_faults_resets_fields_not_given(sandbox: SandboxClient) -> None:
    sandbox.post("/sandbox/faults", json={"fault_rate": 0.1, "latency_ms": 2})

    answer = sandbox.post("/sandbox/faults", json={"timeout_rate": 0.2})

    assert answer.json()["global"] == {**NO_FAULTS, "timeout_rate": 0.2}


def test_post_faults_with_only_honour_keys_keeps_faults(sandbox: SandboxClient) -> None:
    sandbox.post("/sandbox/faults", json={"fault_rate": 0.1})

    answer = sandbox.post("/sandbox/faults", json={"honour_keys": False})

    assert answer.json()["global"] == {**NO_FAULTS, "fault_rate": 0.1}
    assert answer.json()["honour_keys"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"fault_rate": 1.5}, "fault_rate"),
        ({"timeout_rate": -0.5}, "timeout_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"fault_rate": 0.6, "lost_reply_rate": 0.6}, None),
        ({"retry_rate": 0.1}, "retry_rate"),
        ({"service": "inventory", "fault_rate": 0.1}, "service"),
    ],
)
def test_post_faults_rejects_invalid_bodies(
    sandbox: SandboxClient, body: dict[str, object], field: str | None
) -> None:
    answer = sandbox.post("/sandbox/faults", json=body)

    assert answer.status_code == 422
    if field is not None:
        assert any(field in error["loc"] for error in answer.json()["detail"])
    assert sandbox.get("/sandbox/faults").json()["global"] == NO_FAULTS


def test_effects_report_has_the_contract_shape(sandbox: SandboxClient) -> None:
    _charge(sandbox, "o-1", "order:o-1:charge")

    [effect] = sandbox.effects()

    assert set(effect) == {
        "kind",
        "idempotency_key",
        "order_id",
        "amount",
        "currency",
        "at",
        "service",
        "crawl_id",
        "body",
        "template",
    }
    assert effect["idempotency_key"] == "order:o-1:charge"
    assert effect["template"] is None
    _notify(sandbox, "o-1", "order:o-1:notify")
    assert sandbox.effects(kind="notification")[0]["template"] is not None


def test_effects_filter_by_kind_and_order(sandbox: SandboxClient) -> None:
    _charge(sandbox, "o-1", "c1")
    _notify(sandbox, "o-1", "n1")
    _charge(sandbox, "o-2", "c2")

    def keys(**filters: str) -> list[object]:
        return [e["idempotency_key"] for e in sandbox.effects(**filters)]

    assert keys() == ["c1", "n1", "c2"]
    assert keys(kind="charge") == ["c1", "c2"]
    assert keys(kind="notification") == ["n1"]
    assert keys(order_id="o-1") == ["c1", "n1"]
    assert keys(kind="charge", order_id="o-2") == ["c2"]
    assert sandbox.get("/sandbox/effects", params={"kind": "refund"}).status_code == 422


def test_requests_filter_by_service_and_limit(sandbox: SandboxClient) -> None:
    _charge(sandbox, "o-1", "c1")
    _notify(sandbox, "o-1", "n1")
    _charge(sandbox, "o-2", "c2")

    def keys(**filters: str | int) -> list[object]:
        return [r["idempotency_key"] for r in sandbox.requests(**filters)]

    assert keys() == ["c1", "n1", "c2"]
    assert keys(service="payments") == ["c1", "c2"]
    assert keys(limit=2) == ["n1", "c2"]
    assert keys(service="payments", limit=1) == ["c2"]
    assert sandbox.get("/sandbox/requests", params={"service": "inventory"}).status_code == 422
    assert sandbox.get("/sandbox/requests", params={"limit": 0}).status_code == 422


def test_reset_clears_reports_and_keys_but_keeps_faults(sandbox: SandboxClient) -> None:
    _charge(sandbox, "o-1", "k")
    sandbox.post("/sandbox/faults", json={"service": "customers", "fault_rate": 1.0})

    answer = sandbox.post("/sandbox/reset")

    assert (answer.status_code, answer.json()) == (200, {"ok": True})
    assert (sandbox.effects(), sandbox.requests()) == ([], [])
    assert sandbox.get("/sandbox/faults").json()["services"]["customers"]["fault_rate"] == 1.0
    _charge(sandbox, "o-1", "k")
    assert len(sandbox.effects()) == 1
