"""The order-placed pipeline with a null provider, for `oncelery bench`, which then measures
oncelery and Celery rather than HTTP. Workers load it with
`ONCELERY_PIPELINES=jobs.tools.bench.pipeline`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from config import Settings
from jobs.orders.steps import charge, gather, notify
from jobs.pipelines import Delivery, Pipeline, Step
from jobs.provider import ProviderClient
from ledger import JSON

#: The pipeline's name; its tasks are `oncelery.bench-order-placed.<step>`.
BENCH_PIPELINE: Final = "bench-order-placed"
#: The price of every item, in minor units.
_UNIT_AMOUNT: Final = 1250


class NullProvider(ProviderClient):
    """A provider that answers at once, from memory, without I/O, in the sandbox's shapes."""

    def __init__(self) -> None:
        super().__init__(base_url="null://provider", timeout=1.0)

    def get(self, path: str) -> dict[str, JSON]:
        """A customer (every id exists)."""
        customer_id = path.rsplit("/", 1)[-1]
        return {
            "id": customer_id,
            "name": "Ada Lovelace",
            "email": f"{customer_id}@example.com",
            "status": "active",
        }

    def post(
        self, path: str, body: Mapping[str, JSON], *, idempotency_key: str | None = None
    ) -> dict[str, JSON]:
        """A price quote, a charge or a notification, by path."""
        if path == "/prices/quote":
            return _quote(body)
        digest = hashlib.sha256((idempotency_key or "").encode()).hexdigest()[:32]
        if path == "/payments/charges":
            return {"id": f"ch_{digest}", "status": "succeeded", **dict(body)}
        return {"id": f"nt_{digest}", "status": "sent", "order_id": body.get("order_id")}


def _quote(body: Mapping[str, JSON]) -> dict[str, JSON]:
    items = body.get("items")
    lines: list[JSON] = []
    total = 0
    for item in items if isinstance(items, list) else []:
        quantity = item.get("quantity") if isinstance(item, dict) else None
        count = quantity if isinstance(quantity, int) else 1
        sku = item.get("sku") if isinstance(item, dict) else None
        amount = _UNIT_AMOUNT * count
        total += amount
        lines.append({"sku": sku, "quantity": count, "unit_amount": _UNIT_AMOUNT, "amount": amount})
    return {"currency": body.get("currency"), "lines": lines, "total_amount": total}


def _null_provider(_settings: Settings) -> ProviderClient:
    return NullProvider()


#: The order-placed pipeline's copy, keyed apart from it (`bench:<order_id>:<step>`): the same
#: three steps (gather → act → publish), the same step functions and the same protocol (claim,
#: record, history, job advance); only the provider differs.
bench_order_placed: Pipeline[ProviderClient] = Pipeline(
    name=BENCH_PIPELINE,
    steps=[
        Step("gather", gather, key="bench:{order_id}:gather", delivery=Delivery.READ_ONLY),
        Step("act", charge, key="bench:{order_id}:charge", effect="charge"),
        Step("publish", notify, key="bench:{order_id}:notify", effect="notification"),
    ],
    resources=_null_provider,
)
