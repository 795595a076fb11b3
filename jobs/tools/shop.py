"""A user's own Celery app (`Celery("shop")`, not `jobs.app`) whose existing tasks were made
exactly once with `exactly_once`: the README's adoption example, what `oncelery chaos --tasks`
and the tests run (`celery -A jobs.tools.shop worker`), on `BROKER_URL` and `PROVIDER_URL`."""

from __future__ import annotations

import os
from typing import Any, Final

from celery import Celery, Task
from celery.signals import worker_process_shutdown

from config import get_settings

# A user's module writes `from jobs import Delivery, exactly_once, idempotency_key`; inside
# the package, the parts' own names keep the imports one way (tests/unit/jobs/test_layout.py).
from jobs.pipelines import Delivery
from jobs.provider import ProviderClient
from jobs.tasks import exactly_once, idempotency_key
from ledger import JSON

#: The queue the shop's tasks go to (its workers consume it).
QUEUE: Final = "shop"

app = Celery("shop", broker=get_settings().broker_url)
app.conf.update(
    # What `exactly_once` needs (checked when a worker starts): a message is acknowledged
    # after its call is recorded, and given back when its worker dies.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=QUEUE,
    task_serializer="json",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Redis hands a dead worker's unacknowledged messages back after this (an hour by
    # default); the ledger absorbs an early redelivery of a call still running.
    broker_transport_options={"visibility_timeout": 30},
)

_clients: dict[tuple[int, str], ProviderClient] = {}


def provider() -> ProviderClient:
    """This process's client of the provider (opened on first use, so after the fork)."""
    settings = get_settings()
    where = (os.getpid(), settings.provider_url)
    if where not in _clients:
        _clients[where] = ProviderClient(base_url=where[1], timeout=settings.provider_timeout)
    return _clients[where]


@worker_process_shutdown.connect
def close_clients(**_: Any) -> None:
    """Close this process's provider clients (a pool child stopping; a test done)."""
    while _clients:
        _clients.popitem()[1].close()


@app.task(name="shop.reserve")
@exactly_once(key="reserve:{order_id}")
def reserve(order_id: str, customer_id: str, sku: str, quantity: int) -> dict[str, JSON]:
    """The chain's first task: the order's price, quoted by the provider (no effect)."""
    quote = provider().post(
        "/prices/quote",
        {"currency": "EUR", "items": [{"sku": sku, "quantity": quantity}]},
        idempotency_key=idempotency_key(),
    )
    return {"order_id": order_id, "customer_id": customer_id, "amount": quote["total_amount"]}


@app.task(name="shop.charge", bind=True)
@exactly_once(key="charge:{reservation[order_id]}", effect="charge")
def charge(self: Task[Any, Any], reservation: dict[str, Any]) -> dict[str, JSON]:
    """Charge the order (a bound task, as many existing ones are): once, whatever redelivers
    or re-sends it."""
    del self
    answer = provider().post(
        "/payments/charges",
        {
            "order_id": reservation["order_id"],
            "customer_id": reservation["customer_id"],
            "amount": reservation["amount"],
            "currency": "EUR",
        },
        idempotency_key=idempotency_key(),
    )
    return {**reservation, "charge_id": answer.get("id")}


@app.task(name="shop.notify")
@exactly_once(key="notify:{charged[order_id]}", effect="notification")
def notify(charged: dict[str, Any]) -> dict[str, JSON]:
    """Tell the customer, once."""
    provider().post(
        "/notifications",
        {
            "order_id": charged["order_id"],
            "customer_id": charged["customer_id"],
            "template": "order_confirmed",
        },
        idempotency_key=idempotency_key(),
    )
    return {"order_id": charged["order_id"], "notified": True}


@app.task(name="shop.note")
@exactly_once(key="note:{order_id}", delivery=Delivery.AT_MOST_ONCE, effect="notification")
def note(order_id: str, customer_id: str) -> dict[str, JSON]:
    """At most once: for a provider that ignores keys (the key goes along all the same, so
    that the audit can match the effect to it)."""
    provider().post(
        "/notifications",
        {"order_id": order_id, "customer_id": customer_id, "template": "note"},
        idempotency_key=idempotency_key(),
    )
    return {"order_id": order_id}
