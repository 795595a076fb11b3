"""Properties of the sandbox under random faults: keys bound the charges, whatever the dice say."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.sandbox import Faults, SandboxStore
from tests.sandbox_client import SandboxClient, open_sandbox

#: Beyond this many attempts a retrying client gives up (0.8 ** 200 makes that vanishingly rare).
MAX_ATTEMPTS = 200
#: The rates sum to at most this, so every attempt has a fair chance of a final answer.
MAX_TOTAL_RATE = 0.8

ORDERS = [f"o-{n}" for n in range(6)]


@st.composite
def fault_sets(draw: st.DrawFn) -> Faults:
    """Draw random rates whose sum stays at most MAX_TOTAL_RATE; no latency, to stay fast."""
    rates = [draw(st.floats(min_value=0.0, max_value=1.0)) for _ in range(3)]
    total = sum(rates)
    if total > MAX_TOTAL_RATE:
        rates = [rate * MAX_TOTAL_RATE / total for rate in rates]
    return Faults(fault_rate=rates[0], timeout_rate=rates[1], lost_reply_rate=rates[2])


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxStore]:
    """One store for every example (reset before each), as Hypothesis forbids per-test fixtures."""
    path: Path = tmp_path_factory.mktemp("sandbox") / "sandbox.sqlite3"
    store = SandboxStore(path)
    yield store
    store.close()


def _send_charge(sandbox: SandboxClient, order_id: str, *, retry: bool) -> int:
    """Send one order's charge with its key; retry while the answer is a 5xx, if asked."""
    body = {"order_id": order_id, "customer_id": "c-1", "amount": 700, "currency": "EUR"}
    headers = {"Idempotency-Key": f"order:{order_id}:charge"}
    for _ in range(MAX_ATTEMPTS):
        status = sandbox.post("/payments/charges", json=body, headers=headers).status_code
        if status < 500 or not retry:
            return status
    return status


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    faults=fault_sets(),
    sends=st.lists(st.sampled_from(ORDERS), min_size=1, max_size=15),
    retry=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_charges_never_exceed_distinct_keys(
    shared_store: SandboxStore, faults: Faults, sends: list[str], retry: bool, seed: int
) -> None:
    shared_store.reset()
    with open_sandbox(shared_store, faults, hang_seconds=0.0, seed=seed) as sandbox:
        final = {order_id: _send_charge(sandbox, order_id, retry=retry) for order_id in sends}
        charges = Counter(str(e["idempotency_key"]) for e in sandbox.effects(kind="charge"))

    assert sum(charges.values()) <= len(set(sends))
    assert all(count == 1 for count in charges.values())
    for order_id, status in final.items():
        if status == 201:
            assert charges[f"order:{order_id}:charge"] == 1
    if retry:
        assert set(final.values()) == {201}
        assert sum(charges.values()) == len(set(sends))
