"""The order pipelines shipped with oncelery: order-placed (gather → act → publish, run for
each order-placed event) and order-fulfilment (the same, then a wait for the order's `shipped`
signal and a notification that it shipped, or a reminder)."""

from __future__ import annotations

from collections.abc import Sequence

from config import Settings
from jobs.engine.dispatch import Dispatch
from jobs.engine.enqueue import Enqueued, start_jobs
from jobs.orders.event import (
    ORDER_PLACED,
    Order,
    OrderItem,
    OrderPlaced,
    describe_validation_error,
    parse_event_lines,
    parse_events,
)
from jobs.orders.fulfilment import ORDER_FULFILMENT, SHIPPED, order_fulfilment
from jobs.orders.steps import charge, gather, notify
from jobs.pipelines import Delivery, Pipeline, Step
from jobs.provider import ProviderClient
from ledger import JobStore, NewJob

__all__ = [
    "ORDER_FULFILMENT",
    "SHIPPED",
    "Order",
    "OrderItem",
    "OrderPlaced",
    "describe_validation_error",
    "enqueue_orders",
    "order_fulfilment",
    "order_job",
    "order_placed",
    "parse_event_lines",
    "parse_events",
]


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


#: The flagship pipeline.
order_placed: Pipeline[ProviderClient] = Pipeline(
    name=ORDER_PLACED,
    steps=[
        Step("gather", gather, key="order:{order_id}:gather", delivery=Delivery.READ_ONLY),
        Step("act", charge, key="order:{order_id}:charge", effect="charge"),
        Step("publish", notify, key="order:{order_id}:notify", effect="notification"),
    ],
    resources=_provider,
    input=Order,
)


def order_job(event: OrderPlaced) -> NewJob:
    """The job for one event: the event id deduplicates, the rest is the job's context."""
    return order_placed.new_job(event.event_id, event.model_dump(mode="json", exclude={"event_id"}))


def enqueue_orders(
    store: JobStore, dispatch: Dispatch, events: Sequence[OrderPlaced]
) -> list[Enqueued]:
    """Start one order-placed job per event."""
    pipeline: Pipeline[object] = order_placed  # type: ignore[assignment]
    return start_jobs(store, dispatch, pipeline, [order_job(event) for event in events])
