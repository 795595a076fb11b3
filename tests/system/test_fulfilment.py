"""order-fulfilment with real workers and beat's timer loop, on each broker: 40 orders, half
of them signalled `shipped` — some before their job waits, some twice — through the signed
route, `jobs.signal` and the CLI, a worker SIGKILLed while they wait, one cancelled while it
waits, a short reminder timeout for the rest. Every order gets exactly one shipping notice,
the one its wait's result says; the audit agrees. (The long run, 1,000 orders under fire:
`oncelery chaos --pipeline order-fulfilment`, opt-in in test_fulfilment_chaos.py.)"""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from typing import Any

import pytest

import jobs
from config import get_settings
from jobs.ops.history import history_view
from jobs.tools.shipping import ShippingPlan, Warehouse, cli_sender, webhook_sender
from ledger import JSON, JobState
from tests.factories import order_event
from tests.system.conftest import SystemFactory

pytestmark = pytest.mark.system

ORDERS = 40
SECRET, TOKEN = "whsec-fulfilment-test", "token-fulfilment-test"
SETTINGS = {
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "5",
    "ONCELERY_RELAY_AFTER": "1",
    "ONCELERY_SHIP_REMINDER_AFTER": "6",
}


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_each_order_gets_the_one_notice_its_wait_says(
    kind: str,
    request: pytest.FixtureRequest,
    postgres_url: str,
    system_factory: SystemFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given workers, beat and the API on Postgres and the broker
    broker_url = str(request.getfixturevalue(f"{kind}_url"))
    system = system_factory(
        database_url=postgres_url, broker_url=broker_url, workers=2, extra_env=SETTINGS
    )
    system.start_beat()
    api = system.start_api(WEBHOOK_SECRET=SECRET, API_TOKEN=TOKEN)
    for name in ("DATABASE_URL", "BROKER_URL", "ONCELERY_DATA_DIR", "PROVIDER_URL"):
        monkeypatch.setenv(name, system.env[name])
    get_settings.cache_clear()
    prefix = f"ful-{uuid.uuid4().hex[:6]}-"
    events = [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(ORDERS)]
    order_ids = [str(event["order_id"]) for event in events]
    plan = ShippingPlan.for_orders(order_ids)

    def python_api(order_id: str, signal_id: str, data: JSON) -> str:
        return str(jobs.signal("shipped", order_id, signal_id=signal_id, data=data))

    ways = [("webhook", webhook_sender(api, SECRET)), ("python", python_api)] * 6
    warehouse = Warehouse(plan, [*ways[:-1], ("cli", cli_sender(system.env))], parallel=2)

    # When some orders are shipped before their jobs exist, then the orders come in
    warehouse.ship_early()
    done = system.cli("enqueue", "--pipeline", "order-fulfilment", "-", stdin=_lines(events))
    assert done.returncode == 0, done.stderr
    job_ids = dict(zip(order_ids, done.stdout.split(), strict=True))
    # a worker is SIGKILLed once jobs wait, and a waiting order is cancelled
    unshipped = order_ids[1]
    assert unshipped not in (*plan.early, *plan.late)
    system.wait_for(lambda: bool(_view(system, job_ids[unshipped])["waiting"]), "a wait")
    assert _view(system, job_ids[unshipped])["waiting"].startswith(
        f"waiting for signal shipped (key {unshipped}) until "
    )
    killed = next(p for p in system.started if p.name == "worker0")
    killed.signal(signal.SIGKILL)
    killed.stop()
    system.started.remove(killed)
    assert system.cli_json("cancel", job_ids[unshipped])["cancelled"] is True
    # and the others are shipped once their jobs wait (through each way in)
    system.wait_for(
        lambda: warehouse.ship_waiting(system.store, prefix) == 0, "every order shipped", 90
    )

    # Then every order ends: one cancelled, the rest succeeded
    counts = system.wait_finished(prefix, ORDERS, timeout=120)
    assert (counts[JobState.SUCCEEDED], counts[JobState.CANCELLED]) == (ORDERS - 1, 1), counts
    assert warehouse.failures == []
    assert set(warehouse.ways) == {"webhook", "python", "cli"}
    assert warehouse.answers == Counter(
        {"recorded": len(plan.early) + len(plan.late), "duplicate": len(plan.twice)}
    )
    # each with the one notice its wait's result says, an early one surely `order_shipped`
    notices = _notices(system.effects(), prefix)
    for order_id, job_id in job_ids.items():
        waited = _view(system, job_id)["results"].get("wait_shipped")
        if order_id == unshipped:
            assert (waited, notices.get(order_id)) == (None, None)
            continue
        expected = "order_shipped" if waited["by"] == "signal" else "ship_reminder"
        assert notices.get(order_id) == [expected], (order_id, waited)
        if order_id in plan.early:
            assert waited["by"] == "signal"
        if order_id not in (*plan.early, *plan.late):
            assert waited["by"] == "timeout"
    audit = system.cli_json("audit")
    assert audit["clean"], audit["drift"]
    assert audit["fulfilment"]["orders"] == ORDERS
    assert system.cli_json("status")["signals"] == {
        "waiting_jobs": 0,
        "kept": len(plan.early) + len(plan.late) - audit["fulfilment"]["signalled"],
    }


def _lines(events: list[dict[str, object]]) -> str:
    return "".join(json.dumps(event) + "\n" for event in events)


def _view(system: Any, job_id: str) -> Any:
    return history_view(system.store.history(uuid.UUID(job_id)))


def _notices(effects: list[dict[str, object]], prefix: str) -> dict[str, list[str]]:
    """The shipping notices each order got."""
    found: dict[str, list[str]] = {}
    for effect in effects:
        template, order = effect.get("template"), str(effect.get("order_id"))
        if template in ("order_shipped", "ship_reminder") and order.startswith(prefix):
            found.setdefault(order, []).append(str(template))
    return found
