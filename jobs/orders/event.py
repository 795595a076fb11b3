"""The order-placed event: its JSON shape (the contract's), and reading events from text, one
JSON object or JSON Lines, with errors that name the line and the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from jobs.events import EventId, describe_errors, no_nul, read_events
from jobs.pipelines import registry

#: The order-placed pipeline's name.
ORDER_PLACED = "order-placed"


_Text = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul)]


class OrderItem(BaseModel):
    """One line of an order."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sku: _Text
    quantity: int = Field(gt=0, le=1_000_000)


class Order(BaseModel):
    """The order-placed pipeline's input: an order-placed event without its `event_id`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    order_id: Annotated[
        str, StringConstraints(min_length=1, max_length=100), AfterValidator(no_nul)
    ]
    customer_id: _Text
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    items: list[OrderItem] = Field(min_length=1, max_length=100)


class _Identified(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: EventId


class OrderPlaced(Order, _Identified):
    """The order-placed event; unknown fields are rejected, and nothing is coerced. Its
    `event_id` comes first (pydantic orders fields from the last base to the first), as in
    the contract, so a bad event reports its problems in the same order as always."""


def parse_events(text: str) -> list[OrderPlaced]:
    """Parse one JSON event, or JSON Lines (one event a line; blank lines are skipped).

    Raises:
        InvalidEvent: naming the line (for JSON Lines) and the field of the first problem.
    """
    return [event for _, event in parse_event_lines(text)]


def parse_event_lines(text: str) -> list[tuple[int | None, OrderPlaced]]:
    """`parse_events`, each event with its line number (None for a single JSON event); read
    as the events of any pipeline are (`jobs.events`), by the order-placed pipeline's input."""
    # Looked up, not imported: the pipeline is declared in this package's `__init__`.
    pipeline = registry.get(ORDER_PLACED)
    return [
        (event.line, OrderPlaced.model_validate({"event_id": event.event_id, **event.context}))
        for event in read_events(pipeline, text)
    ]


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a validation error, naming its field (`items[0].quantity: …`)."""
    return describe_errors(exc.errors())
