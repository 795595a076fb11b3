"""A signal's parts validated alike for `jobs.signal`, the CLI and the HTTP route: each error
names its field."""

from __future__ import annotations

import pytest

from jobs.signals import MAX_DATA_BYTES, InvalidSignal, new_signal, read_signal
from ledger import NewSignal


def test_a_valid_signal() -> None:
    assert new_signal("order.shipped", "o-1", "s-1", {"carrier": ["DHL"]}) == NewSignal(
        "order.shipped", "o-1", "s-1", {"carrier": ["DHL"]}
    )
    assert read_signal("shipped", {"key": "o-1", "signal_id": "s-1"}).data is None


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        (("", "o-1", "s-1", None), "name"),
        (("-shipped", "o-1", "s-1", None), "name"),
        (("ship/ped", "o-1", "s-1", None), "name"),
        (("x" * 101, "o-1", "s-1", None), "name"),
        (("shipped", "", "s-1", None), "key"),
        (("shipped", "k" * 301, "s-1", None), "key"),
        (("shipped", "o\x00", "s-1", None), "key"),
        (("shipped", "o-1", "", None), "signal_id"),
        (("shipped", "o-1", "s" * 201, None), "signal_id"),
        (("shipped", "o-1", "s-1", {"a": float("nan")}), "data"),
        (("shipped", "o-1", "s-1", {"a": "x" * MAX_DATA_BYTES}), "data"),
        (("shipped", "o-1", "s-1", ["\x00"]), "data"),
    ],
)
def test_a_bad_part_is_named(parts: tuple[str, str, str, object], field: str) -> None:
    with pytest.raises(InvalidSignal) as raised:
        new_signal(*parts)  # type: ignore[arg-type]

    assert raised.value.problem.startswith(f"{field}: ")
    assert raised.value.fields[0]["field"].startswith(field)


def test_a_body_with_unknown_or_mistyped_fields_is_refused() -> None:
    with pytest.raises(InvalidSignal, match="colour: unknown field"):
        read_signal("shipped", {"key": "o-1", "signal_id": "s-1", "colour": 1})
    with pytest.raises(InvalidSignal, match="key: Input should be a valid string"):
        read_signal("shipped", {"key": 1, "signal_id": "s-1"})
