"""The order-placed event: its JSON shape (the contract's), and reading events from text, one
JSON object or JSON Lines, with errors that name the line and the field."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from jobs.errors import InvalidEvent


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


def parse_events(text: str) -> list[OrderPlaced]:
    """Parse one JSON event, or JSON Lines (one event a line; blank lines are skipped).

    Raises:
        InvalidEvent: naming the line (for JSON Lines) and the field of the first problem.
    """
    return [event for _, event in parse_event_lines(text)]


def parse_event_lines(text: str) -> list[tuple[int | None, OrderPlaced]]:
    """`parse_events`, each event with its line number (None for a single JSON event)."""
    stripped = text.strip()
    if not stripped:
        raise InvalidEvent("no event given (empty input)")
    try:
        whole = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        whole = None
    else:
        if isinstance(whole, dict):
            return [(None, _validate(whole, line=None))]
    events: list[tuple[int | None, OrderPlaced]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON ({exc.msg} at column {exc.colno})", line=number) from None
        except RecursionError:
            raise InvalidEvent("JSON nested too deeply", line=number) from None
        events.append((number, _validate(value, line=number)))
    return events


def _validate(value: object, *, line: int | None) -> OrderPlaced:
    if not isinstance(value, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(value).__name__}", line=line)
    try:
        return OrderPlaced.model_validate(value)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc), line=line) from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a validation error, naming its field (`items[0].quantity: …`)."""
    first = exc.errors()[0]
    field = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    ).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{field or 'event'}: {message}{suffix}"
