"""Events of any pipeline: an `event_id` beside the pipeline's input (its pydantic model), read
from one JSON object, JSON Lines or a Python payload, with errors naming the line and field."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

from pydantic import AfterValidator, StringConstraints, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from jobs.errors import InvalidEvent
from jobs.pipelines import Pipeline
from ledger import JSON, NewJob


def no_nul(value: str) -> str:
    """Refuse NUL characters: Postgres text and JSONB cannot hold them."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


#: An event id: what makes two events of one pipeline the same event.
EventId = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul)]
_EVENT_ID: Final = TypeAdapter(EventId)


@dataclass(frozen=True)
class Event:
    """One event of a pipeline: its id, the job context its payload gave, and its line (None
    for a single JSON object or a Python payload)."""

    event_id: str
    context: dict[str, JSON]
    line: int | None = None

    def new_job(self, pipeline: Pipeline[object]) -> NewJob:
        """The job this event starts."""
        return pipeline.new_job(self.event_id, self.context)


def read_event(pipeline: Pipeline[object], value: object, *, line: int | None = None) -> Event:
    """An event from a JSON value: `event_id` and the pipeline's input fields side by side.

    Raises:
        InvalidEvent: naming the line and the field of the first problem (`fields`: all).
    """
    if not isinstance(value, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(value).__name__}", line=line)
    errors: list[ErrorDetails] = []
    event_id = ""
    if "event_id" not in value:
        errors.append(
            {"type": "missing", "loc": ("event_id",), "msg": "Field required", "input": value}
        )
    else:
        try:
            event_id = _EVENT_ID.validate_python(value["event_id"], strict=True)
        except ValidationError as exc:
            errors.extend({**error, "loc": ("event_id", *error["loc"])} for error in exc.errors())
    context: dict[str, JSON] = {}
    try:
        context = pipeline.validate_input({k: v for k, v in value.items() if k != "event_id"})
    except ValidationError as exc:
        errors.extend(exc.errors())
    except InvalidEvent as exc:
        raise InvalidEvent(exc.problem, line=line) from None
    if not errors:
        errors.extend(_key_errors(pipeline, context))
    if errors:
        raise InvalidEvent(describe_errors(errors), line=line, fields=error_fields(errors))
    return Event(event_id, context, line)


def _key_errors(pipeline: Pipeline[object], context: dict[str, JSON]) -> list[ErrorDetails]:
    """A missing-field error for each context field a step's key template names and the
    event lacks (a pipeline without an input model takes any object)."""
    needs: dict[str, str] = {}
    for step in pipeline.steps:
        for name in sorted(step.key_fields() - set(context)):
            needs.setdefault(name, step.name)
    return [
        {
            "type": "missing",
            "loc": (name,),
            "msg": f"Field required (step {step!r}'s key names it)",
            "input": context,
        }
        for name, step in needs.items()
    ]


def payload_event(pipeline: Pipeline[object], payload: object, *, event_id: str) -> Event:
    """An event from a Python payload (a mapping, or an instance of the pipeline's input
    model) and its id, as `jobs.enqueue` takes them.

    Raises:
        InvalidEvent: naming the field of the first problem.
    """
    if isinstance(payload, Mapping) and "event_id" in payload:
        raise InvalidEvent("event_id: not part of the payload; pass it as event_id=")
    context = pipeline.validate_input(payload) if not isinstance(payload, Mapping) else payload
    return read_event(pipeline, {"event_id": event_id, **context})


def read_events(pipeline: Pipeline[object], text: str) -> list[Event]:
    """Events from one JSON object, or JSON Lines (one a line; blank lines are skipped).

    Raises:
        InvalidEvent: naming the line (for JSON Lines) and the field of the first problem.
    """
    return [read_event(pipeline, value, line=line) for line, value in json_values(text)]


def json_values(text: str) -> list[tuple[int | None, object]]:
    """The JSON values of one JSON object or of JSON Lines, each with its line number (None
    for a single object).

    Raises:
        InvalidEvent: the input is empty, or a line is not JSON (naming it).
    """
    stripped = text.strip()
    if not stripped:
        raise InvalidEvent("no event given (empty input)")
    try:
        whole = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        whole = None
    else:
        if isinstance(whole, dict):
            return [(None, whole)]
    values: list[tuple[int | None, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON ({exc.msg} at column {exc.colno})", line=number) from None
        except RecursionError:
            raise InvalidEvent("JSON nested too deeply", line=number) from None
    return values


def describe_errors(errors: Sequence[ErrorDetails]) -> str:
    """The first of validation errors, naming its field (`items[0].quantity: …`)."""
    first = errors[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{field_name(first['loc']) or 'event'}: {message}{suffix}"


def error_fields(errors: Sequence[ErrorDetails]) -> tuple[dict[str, str], ...]:
    """Every validation error as `{"field", "message"}`."""
    return tuple(
        {
            "field": field_name(error["loc"]),
            "message": error["msg"] if error["type"] != "extra_forbidden" else "unknown field",
        }
        for error in errors
    )


def field_name(location: tuple[int | str, ...]) -> str:
    """A field's path as people write it: `items[0].quantity`."""
    return "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
    ).lstrip(".")
