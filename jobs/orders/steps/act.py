"""act: charge the payment, passing the step's key as `Idempotency-Key` so a repeat after an
ambiguous crash is deduplicated by the payments service."""

from __future__ import annotations

from jobs.orders.steps._fields import integer, obj, text
from jobs.pipelines import StepContext
from jobs.provider import ProviderClient
from ledger import JSON


def charge(ctx: StepContext[ProviderClient]) -> JSON:
    """Charge the customer the amount gathered."""
    gathered = obj(ctx.results.get("gather"), "gather's result")
    amount = integer(gathered, "amount", "gather")
    currency = text(gathered, "currency", "gather")
    charged = ctx.resources.post(
        "/payments/charges",
        {
            "order_id": ctx.context["order_id"],
            "customer_id": ctx.context["customer_id"],
            "amount": amount,
            "currency": currency,
        },
        idempotency_key=ctx.key,
    )
    return {"charge_id": text(charged, "id", "charge"), "amount": amount, "currency": currency}
