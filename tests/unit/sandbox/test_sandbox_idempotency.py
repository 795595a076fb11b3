"""`Idempotency-Key` handling: a repeat applies nothing, a reused key is refused,
scopes, toggles."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from tests.sandbox_client import SandboxClient


def _charge(
    sandbox: SandboxClient,
    key: str | None,
    *,
    order_id: str = "o-1",
    customer_id: str = "c-1",
    amount: int = 1000,
) -> httpx.Response:
    body = {"order_id": order_id, "customer_id": customer_id, "amount": amount, "currency": "EUR"}
    headers = {} if key is None else {"Idempotency-Key": key}
    return sandbox.post("/payments/charges", json=body, headers=headers)


def test_repeat_with_same_key_and_body_returns_first_answer_and_applies_nothing(
    sandbox: SandboxClient,
) -> None:
    first = _charge(sandbox, "order:o-1:charge")
    again = _charge(sandbox, "order:o-1:charge")

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert len(sandbox.effects(kind="charge")) == 1


def test_key_order_and_whitespace_do_not_change_the_fingerprint(sandbox: SandboxClient) -> None:
    first = _charge(sandbox, "k")
    raw = b'{ "currency": "EUR", "amount": 1000, "customer_id": "c-1", "order_id": "o-1" }'

    again = sandbox.post(
        "/payments/charges",
        content=raw,
        headers={"Idempotency-Key": "k", "Content-Type": "application/json"},
    )

    assert (again.status_code, again.json()) == (201, first.json())
    assert len(sandbox.effects()) == 1


def test_same_key_different_body_is_refused_with_422(sandbox: SandboxClient) -> None:
    _charge(sandbox, "k", amount=1000)

    reused = _charge(sandbox, "k", amount=2000)

    assert reused.status_code == 422
    assert reused.json()["error"]["type"] == "idempotency_key_reused"
    assert [e["amount"] for e in sandbox.effects()] == [1000]


def test_without_a_key_every_request_applies(sandbox: SandboxClient) -> None:
    _charge(sandbox, None)
    _charge(sandbox, None)

    assert len(sandbox.effects(kind="charge")) == 2


def test_keys_are_scoped_per_service(sandbox: SandboxClient) -> None:
    notification = {"order_id": "o-1", "customer_id": "c-1", "template": "t"}

    charged = _charge(sandbox, "same-key")
    notified = sandbox.post(
        "/notifications", json=notification, headers={"Idempotency-Key": "same-key"}
    )

    assert (charged.status_code, notified.status_code) == (201, 201)
    assert sorted(str(e["kind"]) for e in sandbox.effects()) == ["charge", "notification"]


def test_keys_ignored_when_not_honoured_but_still_recorded(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(honour_keys=False)

    first = _charge(sandbox, "k")
    again = _charge(sandbox, "k", amount=2000)

    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json()["id"] != again.json()["id"]
    assert [(e["idempotency_key"], e["amount"]) for e in sandbox.effects()] == [
        ("k", 1000),
        ("k", 2000),
    ]
    assert [r["idempotency_key"] for r in sandbox.requests()] == ["k", "k"]


def test_honour_keys_can_be_switched_off_at_run_time(sandbox: SandboxClient) -> None:
    _charge(sandbox, "k")

    switched = sandbox.post("/sandbox/faults", json={"honour_keys": False})
    _charge(sandbox, "k")

    assert switched.json()["honour_keys"] is False
    assert len(sandbox.effects()) == 2


def test_declined_charge_is_kept_under_its_key(sandbox: SandboxClient) -> None:
    first = _charge(sandbox, "k", customer_id="declined-1")
    again = _charge(sandbox, "k", customer_id="declined-1")

    assert first.status_code == again.status_code == 402
    assert again.json() == first.json()
    assert sandbox.effects() == []


def test_invalid_body_is_not_kept_under_its_key(sandbox: SandboxClient) -> None:
    invalid = _charge(sandbox, "k", amount=0)
    valid = _charge(sandbox, "k", amount=1000)

    assert (invalid.status_code, valid.status_code) == (422, 201)
    assert len(sandbox.effects()) == 1


def test_concurrent_repeats_apply_once(make_sandbox: Callable[..., SandboxClient]) -> None:
    # Latency makes every request wait on the loop before processing, so they interleave.
    sandbox = make_sandbox()
    sandbox.post("/sandbox/faults", json={"latency_ms": 5})
    body = {"order_id": "o-1", "customer_id": "c-1", "amount": 1000, "currency": "EUR"}

    def call(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post("/payments/charges", json=body, headers={"Idempotency-Key": "k"})

    answers = sandbox.concurrently([call] * 10)

    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(sandbox.effects()) == 1
