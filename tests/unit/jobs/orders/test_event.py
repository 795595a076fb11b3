"""`jobs.orders.event`: reading order-placed events (one JSON object or JSON Lines) with errors
that name the line and the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.errors import InvalidEvent
from jobs.orders import OrderPlaced, describe_validation_error, parse_events
from tests.factories import order_event

# --- parse_events: what is accepted ---------------------------------------------------------


def test_one_json_object_is_one_event() -> None:
    event = order_event()

    [parsed] = parse_events(json.dumps(event))

    assert parsed.model_dump() == event


def test_a_pretty_printed_object_is_one_event() -> None:
    event = order_event()

    [parsed] = parse_events(json.dumps(event, indent=2) + "\n")

    assert parsed.event_id == event["event_id"]


def test_json_lines_skip_blank_lines_and_keep_their_order() -> None:
    events = [order_event() for _ in range(3)]
    text = "\n".join(
        ["", json.dumps(events[0]), "   ", json.dumps(events[1]), "\t", json.dumps(events[2]), ""]
    )

    parsed = parse_events(text)

    assert [event.event_id for event in parsed] == [event["event_id"] for event in events]


# --- parse_events: what is refused ----------------------------------------------------------


def _problem(text: str) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse_events(text)
    return caught.value


def test_a_bad_line_is_named_by_number_and_field() -> None:
    bad = order_event(items=[{"sku": "SKU-1", "quantity": "2"}])
    text = f"{json.dumps(order_event())}\n\n{json.dumps(bad)}\n{json.dumps(order_event())}\n"

    error = _problem(text)

    assert str(error) == "line 3: items[0].quantity: Input should be a valid integer"
    assert error.line == 3
    assert error.problem == "items[0].quantity: Input should be a valid integer"


def test_the_first_bad_line_is_reported() -> None:
    lines = [order_event(), order_event(currency="eur"), order_event(), {"event_id": 1}]

    error = _problem("\n".join(json.dumps(line) for line in lines))

    assert error.line == 2
    assert str(error).startswith("line 2: currency: ")


def _items(*quantities: object, **extra: object) -> dict[str, object]:
    """Overrides giving the event one item per quantity (`extra` goes into the first)."""
    items = [{"sku": "S", "quantity": quantity} for quantity in quantities]
    items[0].update(extra)
    return {"items": items}


_INTEGER = "Input should be a valid integer"
_PATTERN = "String should match pattern '^[A-Z]{3}$'"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (_items("2"), f"items[0].quantity: {_INTEGER}"),
        (_items(2.5), f"items[0].quantity: {_INTEGER}"),
        (_items(2.0, sku=""), "items[0].sku: String should have at least 1 character"),
        (_items(True), f"items[0].quantity: {_INTEGER}"),
        (_items(1, 0), "items[1].quantity: Input should be greater than 0"),
        (_items(1, sku=""), "items[0].sku: String should have at least 1 character"),
        (_items(1, price=700), "items[0].price: unknown field"),
        ({"items": []}, "items: List should have at least 1 item after validation, not 0"),
        (
            _items(*[1] * 101),
            "items: List should have at most 100 items after validation, not 101",
        ),
        ({"items": {"sku": "S", "quantity": 1}}, "items: Input should be a valid list"),
        ({"currency": "eur"}, f"currency: {_PATTERN}"),
        ({"currency": "EURO"}, f"currency: {_PATTERN}"),
        ({"currency": "EUR\n"}, f"currency: {_PATTERN}"),
        ({"event_id": 7}, "event_id: Input should be a valid string"),
        ({"customer_id": None}, "customer_id: Input should be a valid string"),
        ({"coupon": "FREE"}, "coupon: unknown field"),
    ],
)
def test_each_bad_field_is_named(overrides: dict[str, object], message: str) -> None:
    error = _problem(json.dumps(order_event(**overrides)))

    assert str(error) == message
    assert error.line is None


def test_an_integral_quantity_is_an_integer() -> None:
    # JSON, and the OpenAPI schema's `integer`, do not tell 2.0 from 2; "2" is still refused.
    [event] = parse_events(json.dumps(order_event(**_items(2.0))))

    assert event.items[0].quantity == 2
    assert isinstance(event.items[0].quantity, int)


def test_a_missing_field_is_named() -> None:
    event = order_event()
    del event["order_id"]

    assert str(_problem(json.dumps(event))) == "order_id: Field required"


def test_further_problems_are_counted() -> None:
    event = order_event(currency="eur")
    del event["order_id"]

    assert str(_problem(json.dumps(event))) == "order_id: Field required (and 1 more problem)"
    assert str(_problem("{}")) == "event_id: Field required (and 4 more problems)"


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n"])
def test_empty_input_is_refused(text: str) -> None:
    error = _problem(text)

    assert str(error) == "no event given (empty input)"
    assert error.line is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "line 1: expected a JSON object, got list"),
        ("[{}]", "line 1: expected a JSON object, got list"),
        ("42", "line 1: expected a JSON object, got int"),
        ('"order"', "line 1: expected a JSON object, got str"),
        ("null", "line 1: expected a JSON object, got NoneType"),
    ],
)
def test_a_json_value_other_than_an_object_is_refused(text: str, message: str) -> None:
    assert str(_problem(text)) == message


def test_a_line_that_is_not_json_is_named() -> None:
    error = _problem(f"{json.dumps(order_event())}\n{{not json\n")

    assert error.line == 2
    assert str(error).startswith("line 2: not JSON (")
    assert "at column 2)" in str(error)


@pytest.mark.parametrize(
    "text", ["[" * 100_000, '{"a":' * 100_000], ids=["nested-arrays", "nested-objects"]
)
def test_deeply_nested_json_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidEvent):
        parse_events(text)


# --- describe_validation_error --------------------------------------------------------------


def test_describe_validation_error_joins_the_location() -> None:
    event = order_event(items=[{"sku": "S", "quantity": 1}, {"sku": "S", "quantity": -3}])
    with pytest.raises(ValidationError) as caught:
        OrderPlaced.model_validate(event)

    assert describe_validation_error(caught.value) == (
        "items[1].quantity: Input should be greater than 0"
    )


# --- properties -----------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
_event_like = st.dictionaries(
    st.sampled_from(["event_id", "order_id", "customer_id", "currency", "items", "extra"]),
    _json_values,
)


def _parse(text: str) -> list[OrderPlaced] | InvalidEvent:
    """The events, or the `InvalidEvent` raised; any other exception fails the test."""
    try:
        return parse_events(text)
    except InvalidEvent as error:
        return error


@hypothesis_settings(max_examples=200, deadline=None)
@given(value=_json_values | _event_like)
def test_any_json_value_is_an_event_or_invalid_event(value: object) -> None:
    outcome = _parse(json.dumps(value))

    if isinstance(outcome, InvalidEvent):
        assert str(outcome)
        assert "\n" not in str(outcome)
    else:
        assert all(isinstance(event, OrderPlaced) for event in outcome)


@hypothesis_settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_events_or_invalid_event(text: str) -> None:
    outcome = _parse(text)

    if isinstance(outcome, InvalidEvent):
        assert "\n" not in str(outcome)
    else:
        assert all(isinstance(event, OrderPlaced) for event in outcome)


# Postgres cannot store NUL, so a valid event has none (see jobs/orders/__init__.py).
_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=200
)
_item_lists = st.lists(
    st.fixed_dictionaries(
        {"sku": _text, "quantity": st.integers(min_value=1, max_value=1_000_000)}
    ),
    min_size=1,
    max_size=100,
)
_events: st.SearchStrategy[dict[str, object]] = st.fixed_dictionaries(
    {
        "event_id": _text,
        "order_id": st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
            min_size=1,
            max_size=100,
        ),
        "customer_id": _text,
        "currency": st.from_regex(r"\A[A-Z]{3}\Z"),
        "items": _item_lists,
    }
)


@hypothesis_settings(max_examples=100, deadline=None)
@given(event=_events)
def test_a_valid_event_always_parses(event: dict[str, object]) -> None:
    [parsed] = parse_events(json.dumps(event))

    assert parsed.model_dump() == event


@hypothesis_settings(max_examples=50, deadline=None)
@given(events=st.lists(_events, min_size=1, max_size=5), blanks=st.lists(st.booleans()))
def test_valid_json_lines_always_parse(events: list[dict[str, object]], blanks: list[bool]) -> None:
    lines: list[str] = []
    for number, event in enumerate(events):
        if number < len(blanks) and blanks[number]:
            lines.append("  ")
        lines.append(json.dumps(event))

    parsed = parse_events("\n".join(lines))

    assert [event.model_dump() for event in parsed] == events
