"""What the audit compares: an effect the provider applied, and a disagreement (drift)
between it and the ledger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ledger import JSON


@dataclass(frozen=True)
class Effect:
    """One effect the provider applied."""

    kind: str
    idempotency_key: str | None
    order_id: str | None
    amount: int | None = None
    #: The crawl a dataset was published for.
    crawl_id: str | None = None
    #: What the effect was billed or published for (a query's search, a dataset's places).
    body: JSON = field(default=None, compare=False, repr=False)
    #: A notification's template.
    template: str | None = None

    @classmethod
    def from_json(cls, value: Mapping[str, JSON]) -> Effect:
        """From one item of `GET /sandbox/effects`."""
        key, order, amount, crawl, template = (
            value.get("idempotency_key"),
            value.get("order_id"),
            value.get("amount"),
            value.get("crawl_id"),
            value.get("template"),
        )
        return cls(
            kind=str(value.get("kind")),
            idempotency_key=key if isinstance(key, str) else None,
            order_id=order if isinstance(order, str) else None,
            amount=amount if isinstance(amount, int) else None,
            crawl_id=crawl if isinstance(crawl, str) else None,
            body=value.get("body"),
            template=template if isinstance(template, str) else None,
        )


@dataclass(frozen=True)
class Drift:
    """One disagreement between the ledger and the provider."""

    problem: str
    kind: str
    key: str | None
    order_id: str | None = None
    detail: str = ""

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return {
            "problem": self.problem,
            "kind": self.kind,
            "key": self.key,
            "order_id": self.order_id,
            "detail": self.detail,
        }
