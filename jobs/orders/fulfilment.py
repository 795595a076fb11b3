"""The order-fulfilment pipeline shipped with oncelery: the order-placed steps, then a wait for
the order's `shipped` signal (up to `ONCELERY_SHIP_REMINDER_AFTER`), then one notification:
`order_shipped` if the signal came first, `ship_reminder` if the timeout did."""

from __future__ import annotations

from collections.abc import Mapping

from config import Settings, get_settings
from jobs.orders.event import Order
from jobs.orders.steps import charge, gather, notify
from jobs.orders.steps.shipping import WAIT_STEP, notify_shipping
from jobs.pipelines import Delivery, Pipeline, Step
from jobs.provider import ProviderClient
from jobs.waits import WaitForSignal
from ledger import JSON

ORDER_FULFILMENT = "order-fulfilment"
#: The signal that says an order left the warehouse, keyed by its order id.
SHIPPED = "shipped"


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


def reminder_after(_context: Mapping[str, JSON], _results: Mapping[str, JSON]) -> float:
    """`ONCELERY_SHIP_REMINDER_AFTER`, as the process that moves the order to its wait reads
    it (a bad value stops every process at start, naming the variable)."""
    return get_settings().ship_reminder_after


#: Keys of their own (`fulfil:…`): an order id sent to both pipelines is two requests, and
#: the audit counts each order's effects by order id.
order_fulfilment: Pipeline[ProviderClient] = Pipeline(
    name=ORDER_FULFILMENT,
    steps=[
        Step("gather", gather, key="fulfil:{order_id}:gather", delivery=Delivery.READ_ONLY),
        Step("act", charge, key="fulfil:{order_id}:charge", effect="charge"),
        Step("publish", notify, key="fulfil:{order_id}:notify", effect="notification"),
        WaitForSignal(WAIT_STEP, signal=SHIPPED, key="{order_id}", timeout=reminder_after),
        Step("notify", notify_shipping, key="fulfil:{order_id}:shipping", effect="notification"),
    ],
    resources=_provider,
    input=Order,
)
