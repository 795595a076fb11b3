"""A user's own Celery app (`Celery("proj")`, not `jobs.app`) whose tasks are decorated with
`exactly_once`: what the tests and `oncelery chaos --tasks` run (`celery -A tests.user_app
worker`). It reads `BROKER_URL`, `PROVIDER_URL` and `PROJ_QUEUE` as a user's app would."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from jobs import Delivery, exactly_once, idempotency_key
from jobs.provider import ProviderClient
from ledger import JSON

app = Celery("proj", broker=os.environ.get("BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=os.environ.get("PROJ_QUEUE", "proj"),
    task_serializer="json",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Redis hands a dead worker's unacknowledged messages back after this (an hour by
    # default); the ledger absorbs an early redelivery of a call still running.
    broker_transport_options={"visibility_timeout": 20},
)

_clients: dict[tuple[int, str], ProviderClient] = {}


def provider() -> ProviderClient:
    """This process's client of the sandbox (opened on first use, so after the fork)."""
    where = (os.getpid(), os.environ["PROVIDER_URL"])
    if where not in _clients:
        _clients[where] = ProviderClient(base_url=where[1], timeout=2.0)
    return _clients[where]


@app.task
@exactly_once(key="reserve:{order_id}")
def reserve(order_id: str, customer_id: str, amount: int) -> dict[str, JSON]:
    """The chain's first task: a quote at the provider (no effect)."""
    provider().post(
        "/prices/quote",
        {"currency": "EUR", "items": [{"sku": f"SKU-{amount}", "quantity": 1}]},
        idempotency_key=idempotency_key(),
    )
    return {"order_id": order_id, "customer_id": customer_id, "amount": amount}


@app.task(bind=True)
@exactly_once(key="charge:{reservation[order_id]}", effect="charge")
def charge(self: Task[Any, Any], reservation: dict[str, Any]) -> dict[str, JSON]:
    """Charge the order (bound, as many existing tasks are): once, whatever redelivers it."""
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


@app.task
@exactly_once(key="notify:{charged[order_id]}", effect="notification")
def notify(charged: dict[str, Any]) -> dict[str, JSON]:
    """Tell the customer: once."""
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


@app.task
@exactly_once(key="note:{order_id}", delivery=Delivery.AT_MOST_ONCE, effect="notification")
def note(order_id: str, customer_id: str) -> dict[str, JSON]:
    """At most once: a provider that ignores keys (no `Idempotency-Key` is sent)."""
    provider().post(
        "/notifications",
        {"order_id": order_id, "customer_id": customer_id, "template": "note"},
    )
    return {"order_id": order_id}
