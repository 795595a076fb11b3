"""Injected faults over HTTP: 503s, timeouts, lost replies, per-service overrides, latency."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from jobs.sandbox import Faults
from tests.sandbox_client import SandboxClient

#: The hang used where a test measures it.
HANG_SECONDS = 0.05

CHARGE = {"order_id": "o-1", "customer_id": "c-1", "amount": 1000, "currency": "EUR"}
NOTIFICATION = {"order_id": "o-1", "customer_id": "c-1", "template": "t"}


def _charge(sandbox: SandboxClient, key: str | None = "k") -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return sandbox.post("/payments/charges", json=CHARGE, headers=headers)


def test_fault_rate_one_answers_503_and_applies_nothing(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(Faults(fault_rate=1.0))

    answer = _charge(sandbox)

    assert (answer.status_code, answer.json()) == (503, {"error": {"type": "injected_fault"}})
    assert sandbox.effects() == []
    assert sandbox.get("/customers/c-1").status_code == 503


def test_a_503_is_not_kept_under_the_key(make_sandbox: Callable[..., SandboxClient]) -> None:
    sandbox = make_sandbox(Faults(fault_rate=1.0))
    _charge(sandbox)

    sandbox.post("/sandbox/faults", json={})
    retried = _charge(sandbox)

    assert retried.status_code == 201
    assert len(sandbox.effects()) == 1


def test_timeout_hangs_then_answers_504_and_applies_nothing(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(Faults(timeout_rate=1.0), hang_seconds=HANG_SECONDS)

    started = time.monotonic()
    answer = _charge(sandbox)

    assert time.monotonic() - started >= HANG_SECONDS
    assert answer.status_code == 504
    assert sandbox.effects() == []
    sandbox.post("/sandbox/faults", json={})
    assert _charge(sandbox).status_code == 201
    assert len(sandbox.effects()) == 1


def test_lost_reply_applies_then_answers_504_and_a_retry_gets_the_kept_201(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    # Given a sandbox that loses every reply
    sandbox = make_sandbox(Faults(lost_reply_rate=1.0))

    # When a charge is sent, then retried with the same key once the network heals
    lost = _charge(sandbox)
    [effect] = sandbox.effects()
    sandbox.post("/sandbox/faults", json={})
    retried = _charge(sandbox)

    # Then the first answer was lost but its charge applied, and the retry applied nothing
    assert lost.status_code == 504
    assert effect["idempotency_key"] == "k"
    assert retried.status_code == 201
    assert retried.json()["order_id"] == "o-1"
    assert len(sandbox.effects()) == 1


def test_a_rate_limited_request_is_a_429_with_retry_after_and_applies_nothing(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(Faults(rate_limited_rate=1.0, retry_after_seconds=3600))

    limited = _charge(sandbox)

    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "3600")
    assert sandbox.effects() == []
    sandbox.post("/sandbox/faults", json={})
    assert _charge(sandbox).status_code == 201
    assert len(sandbox.effects()) == 1


def test_lost_reply_without_key_doubles_on_retry(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(Faults(lost_reply_rate=1.0))
    _charge(sandbox, key=None)

    sandbox.post("/sandbox/faults", json={})
    _charge(sandbox, key=None)

    assert len(sandbox.effects()) == 2


def test_per_service_faults_only_affect_that_service(sandbox: SandboxClient) -> None:
    sandbox.post("/sandbox/faults", json={"service": "payments", "fault_rate": 1.0})

    charged = _charge(sandbox)
    notified = sandbox.post("/notifications", json=NOTIFICATION)
    customer = sandbox.get("/customers/c-1")

    assert (charged.status_code, notified.status_code, customer.status_code) == (503, 201, 200)
    assert [e["kind"] for e in sandbox.effects()] == ["notification"]


def test_service_override_beats_global_faults(make_sandbox: Callable[..., SandboxClient]) -> None:
    sandbox = make_sandbox(Faults(fault_rate=1.0))

    sandbox.post("/sandbox/faults", json={"service": "notifications"})

    assert sandbox.post("/notifications", json=NOTIFICATION).status_code == 201
    assert _charge(sandbox).status_code == 503


def test_latency_delays_answers(sandbox: SandboxClient) -> None:
    sandbox.post("/sandbox/faults", json={"latency_ms": 30})

    started = time.monotonic()
    answer = sandbox.get("/customers/c-1")

    assert answer.status_code == 200
    assert time.monotonic() - started >= 0.03


def test_sandbox_endpoints_are_never_faulted(make_sandbox: Callable[..., SandboxClient]) -> None:
    sandbox = make_sandbox(Faults(fault_rate=1.0))

    assert sandbox.get("/healthz").status_code == 200
    assert sandbox.get("/sandbox/faults").status_code == 200
    assert sandbox.get("/sandbox/effects").status_code == 200
    assert sandbox.get("/sandbox/requests").status_code == 200
    assert sandbox.post("/sandbox/reset").status_code == 200


def test_every_request_is_recorded_with_status_and_fault(sandbox: SandboxClient) -> None:
    _charge(sandbox, "k1")
    sandbox.post("/sandbox/faults", json={"fault_rate": 1.0})
    _charge(sandbox, "k2")
    sandbox.post("/sandbox/faults", json={"timeout_rate": 1.0})
    _charge(sandbox, "k3")
    sandbox.post("/sandbox/faults", json={"lost_reply_rate": 1.0})
    sandbox.get("/customers/c-1", params=None)

    assert [
        (r["method"], r["path"], r["service"], r["idempotency_key"], r["status"], r["fault"])
        for r in sandbox.requests()
    ] == [
        ("POST", "/payments/charges", "payments", "k1", 201, None),
        ("POST", "/payments/charges", "payments", "k2", 503, "error"),
        ("POST", "/payments/charges", "payments", "k3", 504, "timeout"),
        ("GET", "/customers/c-1", "customers", None, 504, "lost_reply"),
    ]
    assert all(str(r["at"]).endswith("+00:00") for r in sandbox.requests())


def test_mixed_rates_follow_the_seeded_dice(make_sandbox: Callable[..., SandboxClient]) -> None:
    sandbox = make_sandbox(Faults(fault_rate=0.5), seed=7)

    statuses = [sandbox.get("/customers/c-1").status_code for _ in range(40)]

    assert set(statuses) == {200, 503}
    recorded = sandbox.requests()
    assert [r["status"] for r in recorded] == statuses
    assert all((r["fault"] == "error") == (r["status"] == 503) for r in recorded)
