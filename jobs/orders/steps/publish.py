"""publish: send the customer's confirmation (with its own key) and emit OrderConfirmed."""

from __future__ import annotations

from jobs.orders.steps._fields import obj, text
from jobs.pipelines import StepContext
from jobs.provider import ProviderClient
from ledger import JSON


def notify(ctx: StepContext[ProviderClient]) -> JSON:
    """Notify the customer that the order is confirmed."""
    gathered = obj(ctx.results.get("gather"), "gather's result")
    charged = obj(ctx.results.get("act"), "act's result")
    customer = obj(gathered.get("customer"), "gather.customer")
    sent = ctx.resources.post(
        "/notifications",
        {
            "order_id": ctx.context["order_id"],
            "customer_id": ctx.context["customer_id"],
            "template": "order_confirmed",
            "data": {
                "email": text(customer, "email", "customer"),
                "charge_id": charged.get("charge_id"),
                "amount": charged.get("amount"),
                "currency": charged.get("currency"),
            },
        },
        idempotency_key=ctx.key,
    )
    return {
        "notification_id": text(sent, "id", "notification"),
        "event": {
            "type": "OrderConfirmed",
            "order_id": ctx.context["order_id"],
            "charge_id": charged.get("charge_id"),
        },
    }
