"""gather: fetch what the order needs (the customer and the prices); reads only, no effect."""

from __future__ import annotations

from urllib.parse import quote

from jobs.orders.steps._fields import integer, text
from jobs.pipelines import StepContext
from jobs.provider import ProviderClient
from ledger import JSON


def gather(ctx: StepContext[ProviderClient]) -> JSON:
    """Look up the customer and price the items."""
    customer_id = text(ctx.context, "customer_id", "order")
    customer = ctx.resources.get(f"/customers/{quote(customer_id, safe='')}")
    priced = ctx.resources.post(
        "/prices/quote", {"currency": ctx.context["currency"], "items": ctx.context["items"]}
    )
    return {
        "customer": {
            "id": text(customer, "id", "customer"),
            "email": text(customer, "email", "customer"),
            "name": text(customer, "name", "customer"),
        },
        "lines": priced.get("lines"),
        "amount": integer(priced, "total_amount", "quote"),
        "currency": text(priced, "currency", "quote"),
    }
