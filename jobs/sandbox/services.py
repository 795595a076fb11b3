"""The downstream services the sandbox plays: their names; the shop's bodies and answers
(the places search and datasets are in `places`).

Pure functions of the request: deterministic apart from generated ids, no I/O, no faults.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from .store import EffectKind, NewEffect

#: The prefix of a customer id whose card is always declined (and who reads as `declined`).
DECLINED_PREFIX = "declined"
#: The prefix of a customer id whose payment is always answered 503 (a transient failure that
#: never clears: the order retries until its attempts run out).
UNAVAILABLE_PREFIX = "unavailable"

_FIRST_NAMES = ("Ada", "Alan", "Barbara", "Donald", "Edsger", "Frances", "Grace", "Ken")
_LAST_NAMES = ("Allen", "Dijkstra", "Hopper", "Knuth", "Liskov", "Lovelace", "Thompson", "Turing")

Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Identifier = Annotated[str, Field(min_length=1, max_length=200)]


class Service(enum.StrEnum):
    """A downstream service the sandbox plays; its value is the first segment of its paths."""

    CUSTOMERS = "customers"
    PRICES = "prices"
    PAYMENTS = "payments"
    NOTIFICATIONS = "notifications"
    #: The paid places search (`POST /places/search`).
    PLACES = "places"
    #: Where a crawl publishes its places (`POST /datasets`).
    DATASETS = "datasets"


#: Every service, in the order they are listed in the contract.
SERVICES: tuple[Service, ...] = tuple(Service)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuoteItem(_Body):
    """One line of a price quote request."""

    sku: Identifier
    quantity: int = Field(gt=0, strict=True)


class QuoteRequest(_Body):
    """The body of `POST /prices/quote`."""

    currency: Currency
    items: list[QuoteItem] = Field(min_length=1, max_length=100)


class ChargeRequest(_Body):
    """The body of `POST /payments/charges`; `amount` is in minor units."""

    order_id: Identifier
    customer_id: Identifier
    amount: int = Field(gt=0, strict=True)
    currency: Currency


class NotificationRequest(_Body):
    """The body of `POST /notifications`."""

    order_id: Identifier
    customer_id: Identifier
    template: Identifier
    data: dict[str, JsonValue] | None = None


@dataclass(frozen=True)
class Reply:
    """A service's final answer to a request, and the effect it applies, if any."""

    status: int
    body: dict[str, object]
    effect: NewEffect | None = None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def customer(customer_id: str) -> Reply:
    """Answer `GET /customers/{customer_id}`: every id exists, synthesised from the id itself."""
    digest = _digest(customer_id)
    first = _FIRST_NAMES[digest[0] % len(_FIRST_NAMES)]
    last = _LAST_NAMES[digest[1] % len(_LAST_NAMES)]
    body: dict[str, object] = {
        "id": customer_id,
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}.{digest[2:6].hex()}@example.com",
        "status": "declined" if customer_id.startswith(DECLINED_PREFIX) else "active",
    }
    return Reply(status=200, body=body)


def unit_amount(sku: str) -> int:
    """Return the price of one `sku` in minor units: stable, between 100 and 9999."""
    return 100 + int.from_bytes(_digest(sku), "big") % 9900


def quote(request: QuoteRequest) -> Reply:
    """Answer `POST /prices/quote`: one line per item, amounts in integer minor units."""
    lines: list[dict[str, object]] = []
    total = 0
    for item in request.items:
        unit = unit_amount(item.sku)
        amount = unit * item.quantity
        total += amount
        lines.append(
            {"sku": item.sku, "quantity": item.quantity, "unit_amount": unit, "amount": amount}
        )
    body: dict[str, object] = {
        "currency": request.currency,
        "lines": lines,
        "total_amount": total,
    }
    return Reply(status=200, body=body)


def charge(request: ChargeRequest) -> Reply:
    """Answer `POST /payments/charges`: 201 and a charge effect, or a permanent 402 and none."""
    if request.customer_id.startswith(UNAVAILABLE_PREFIX):
        unavailable: dict[str, object] = {
            "error": {"type": "processor_unavailable", "message": "Try again later."}
        }
        return Reply(status=503, body=unavailable)
    if request.customer_id.startswith(DECLINED_PREFIX):
        declined: dict[str, object] = {
            "error": {"type": "card_declined", "message": "The customer's card was declined."}
        }
        return Reply(status=402, body=declined)
    body: dict[str, object] = {
        "id": f"ch_{uuid.uuid4().hex}",
        "order_id": request.order_id,
        "customer_id": request.customer_id,
        "amount": request.amount,
        "currency": request.currency,
        "status": "succeeded",
    }
    effect = NewEffect(
        kind=EffectKind.CHARGE,
        order_id=request.order_id,
        amount=request.amount,
        currency=request.currency,
    )
    return Reply(status=201, body=body, effect=effect)


def notify(request: NotificationRequest) -> Reply:
    """Answer `POST /notifications`: 201 and a notification effect."""
    body: dict[str, object] = {
        "id": f"nt_{uuid.uuid4().hex}",
        "order_id": request.order_id,
        "customer_id": request.customer_id,
        "template": request.template,
        "status": "sent",
    }
    effect = NewEffect(
        kind=EffectKind.NOTIFICATION, order_id=request.order_id, template=request.template
    )
    return Reply(status=201, body=body, effect=effect)
