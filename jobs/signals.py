"""Signals as people and programs send them (`jobs.signal`, `oncelery signal`, `POST
/signals/{name}`): a name, the key of the waits it is for, an id that makes it once, and data;
validated here alike for all three, each error naming its field."""

from __future__ import annotations

import json
from typing import Annotated, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from jobs.errors import InvalidEvent
from jobs.events import describe_errors, error_fields, no_nul
from ledger import JSON, NewSignal

#: The most bytes a signal's data may take, as compact JSON.
MAX_DATA_BYTES: Final = 16 * 1024

#: A signal's name: what a wait step waits for (`shipped`). Letters, digits and `_.:-`, so
#: that it fits a URL path as it is.
SIGNAL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
SignalName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=SIGNAL_NAME_PATTERN)
]
#: Which waits of that name it is for (an order id, say).
SignalKey = Annotated[str, StringConstraints(min_length=1, max_length=300), AfterValidator(no_nul)]
#: What makes two sends the same signal: the same id again changes nothing.
SignalId = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul)]

_NAME: Final = TypeAdapter(SignalName)


class InvalidSignal(InvalidEvent):
    """Raised when a signal's name, key, id or data is not valid (the message names the field;
    `fields` lists every problem as `{"field", "message"}`)."""


class SignalBody(BaseModel):
    """The body of `POST /signals/{name}` (unknown fields rejected, nothing coerced)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: SignalKey
    signal_id: SignalId
    data: JsonValue = None


def read_signal(name: str, value: object) -> NewSignal:
    """A signal from its name and a JSON value `{"key", "signal_id", "data"?}`.

    Raises:
        InvalidSignal: naming the field of the first problem (`fields`: all).
    """
    check_name(name)
    if not isinstance(value, dict):
        raise InvalidSignal(f"expected a JSON object, got {type(value).__name__}")
    try:
        body = SignalBody.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors()
        raise InvalidSignal(describe_errors(errors), fields=error_fields(errors)) from None
    return new_signal(name, body.key, body.signal_id, body.data)


def new_signal(name: str, key: str, signal_id: str, data: JSON = None) -> NewSignal:
    """A signal from its parts, validated.

    Raises:
        InvalidSignal: naming the part that is not valid.
    """
    check_name(name)
    try:
        body = SignalBody.model_validate({"key": key, "signal_id": signal_id, "data": data})
    except ValidationError as exc:
        errors = exc.errors()
        raise InvalidSignal(describe_errors(errors), fields=error_fields(errors)) from None
    try:
        text = json.dumps(body.data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSignal(f"data: not JSON ({exc})", fields=_field("data", str(exc))) from None
    except RecursionError:
        raise InvalidSignal("data: nested too deeply", fields=_field("data", "too deep")) from None
    if _has_nul(body.data):  # Postgres' JSONB cannot hold it
        problem = "must not contain NUL characters"
        raise InvalidSignal(f"data: {problem}", fields=_field("data", problem))
    size = len(text.encode())
    if size > MAX_DATA_BYTES:
        problem = f"{size} bytes of JSON, more than {MAX_DATA_BYTES}"
        raise InvalidSignal(f"data: {problem}", fields=_field("data", problem))
    value: JSON = json.loads(text)
    return NewSignal(name=name, key=body.key, signal_id=body.signal_id, data=value)


def check_name(name: str) -> str:
    """A signal's name, checked.

    Raises:
        InvalidSignal: it is empty, too long, or has characters other than letters, digits
            and `_.:-` (or starts with one of those four).
    """
    try:
        return _NAME.validate_python(name, strict=True)
    except ValidationError:
        problem = "expected 1 to 100 letters, digits or _.:- (starting with a letter or digit)"
        fields = _field("name", problem)
        raise InvalidSignal(f"name: {problem}, got {name!r}", fields=fields) from None


def _has_nul(value: JsonValue) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _field(name: str, message: str) -> tuple[dict[str, str], ...]:
    return ({"field": name, "message": message},)
