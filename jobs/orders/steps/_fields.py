"""Reading typed fields out of JSON results, failing permanently when a shape is wrong."""

from __future__ import annotations

from collections.abc import Mapping

from jobs.errors import PermanentError
from ledger import JSON


def obj(value: JSON | None, what: str) -> Mapping[str, JSON]:
    """`value` as a JSON object."""
    if not isinstance(value, dict):
        raise PermanentError(f"{what} is not a JSON object")
    return value


def text(source: Mapping[str, JSON], field: str, what: str) -> str:
    """A string field."""
    value = source.get(field)
    if not isinstance(value, str):
        raise PermanentError(f"{what}.{field} is not a string")
    return value


def integer(source: Mapping[str, JSON], field: str, what: str) -> int:
    """An integer field (booleans refused)."""
    value = source.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PermanentError(f"{what}.{field} is not an integer")
    return value
