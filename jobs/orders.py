"""The order-placed event (the contract's JSON shape) and the pipeline that fulfils it:
gather → act → publish."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from config import Settings
from jobs.pipelines import Delivery, Pipeline, Step
from jobs.provider import ProviderClient
from jobs.steps import charge, gather, notify
from ledger import NewJob


def _no_nul(value: str) -> str:
    # Postgres text and JSONB cannot hold NUL: refuse it here, with the field's name.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


_Text = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]


class OrderItem(BaseModel):
    """One line of an order."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sku: _Text
    quantity: int = Field(gt=0, le=1_000_000)


class OrderPlaced(BaseModel):
    """The order-placed event; unknown fields are rejected, and nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: _Text
    order_id: Annotated[
        str, StringConstraints(min_length=1, max_length=100), AfterValidator(_no_nul)
    ]
    customer_id: _Text
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    items: list[OrderItem] = Field(min_length=1, max_length=100)


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


#: The flagship pipeline.
order_placed: Pipeline[ProviderClient] = Pipeline(
    name="order-placed",
    steps=[
        Step("gather", gather, key="order:{order_id}:gather", delivery=Delivery.READ_ONLY),
        Step("act", charge, key="order:{order_id}:charge", effect="charge"),
        Step("publish", notify, key="order:{order_id}:notify", effect="notification"),
    ],
    resources=_provider,
)


def order_job(event: OrderPlaced) -> NewJob:
    """The job for one event: the event id deduplicates, the rest is the job's context."""
    return order_placed.new_job(event.event_id, event.model_dump(mode="json", exclude={"event_id"}))
