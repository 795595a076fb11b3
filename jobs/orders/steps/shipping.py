"""notify (order-fulfilment): tell the customer their order shipped, or remind them it has
not yet — whichever its wait says came first, under one key either way."""

from __future__ import annotations

from jobs.errors import PermanentError
from jobs.orders.steps._fields import obj, text
from jobs.pipelines import StepContext
from jobs.provider import ProviderClient
from ledger import JSON

#: The wait step whose result the notification follows.
WAIT_STEP = "wait_shipped"
#: The template for each way the wait can end.
TEMPLATES = {"signal": "order_shipped", "timeout": "ship_reminder"}


def notify_shipping(ctx: StepContext[ProviderClient]) -> JSON:
    """Send `order_shipped` if the `shipped` signal ended the wait, `ship_reminder` if its
    timeout did (the wait's recorded result is the truth; a retry sends the same one)."""
    waited = obj(ctx.results.get(WAIT_STEP), f"{WAIT_STEP}'s result")
    by = waited.get("by")
    if not isinstance(by, str) or by not in TEMPLATES:
        raise PermanentError(f"{WAIT_STEP}.by is {by!r}, not signal or timeout")
    gathered = obj(ctx.results.get("gather"), "gather's result")
    customer = obj(gathered.get("customer"), "gather.customer")
    template = TEMPLATES[by]
    sent = ctx.resources.post(
        "/notifications",
        {
            "order_id": ctx.context["order_id"],
            "customer_id": ctx.context["customer_id"],
            "template": template,
            "data": {
                "email": text(customer, "email", "customer"),
                "signal_id": waited.get("signal_id"),
                "shipment": waited.get("data"),
            },
        },
        idempotency_key=ctx.key,
    )
    return {"notification_id": text(sent, "id", "notification"), "template": template}
