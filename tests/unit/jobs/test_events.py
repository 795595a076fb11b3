"""`jobs.events` and `Pipeline(input=…)`: any pipeline's events validated by its pydantic input
model, strictly, with errors naming the field; models that would let bad input through are
refused when the pipeline is declared."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from jobs import InvalidEvent, Pipeline, Step
from jobs.events import payload_event, read_event, read_events
from jobs.pipelines import Pipeline as PipelineType
from tests.toy_pipeline import Word, count, toy_typed

TYPED: PipelineType[object] = toy_typed  # type: ignore[assignment]


def _problem(value: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        read_event(TYPED, value)
    return caught.value


def test_an_event_is_its_id_beside_the_validated_input_with_defaults() -> None:
    event = read_event(TYPED, {"event_id": "e1", "word": "hi"})

    assert (event.event_id, event.context) == ("e1", {"word": "hi", "times": 1})
    assert event.new_job(TYPED).step_keys == {"count": "toy-typed:hi:count"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"event_id": "e1", "word": "hi", "times": "2"}, "times: Input should be a valid integer"),
        ({"event_id": "e1", "word": "hi", "times": 2.5}, "times: Input should be a valid integer"),
        # 2.0 is the integer 2 (see below): only the unknown field is wrong.
        ({"event_id": "e1", "word": "hi", "times": 2.0, "colour": 1}, "colour: unknown field"),
        ({"event_id": "e1", "word": "hi", "colour": "red"}, "colour: unknown field"),
        ({"event_id": "e1"}, "word: Field required"),
        ({"word": "hi"}, "event_id: Field required"),
        ({"event_id": 7, "word": "hi"}, "event_id: Input should be a valid string"),
        ({"event_id": "e1", "word": ""}, "word: String should have at least 1 character"),
    ],
)
def test_each_bad_field_is_named_and_nothing_is_coerced(value: object, message: str) -> None:
    assert str(_problem(value)) == message


def test_an_integral_number_is_an_integer() -> None:
    # JSON, and JSON Schema (the API's OpenAPI schema), do not tell 2.0 from 2.
    event = read_event(TYPED, {"event_id": "e1", "word": "hi", "times": 2.0})

    assert event.context == {"word": "hi", "times": 2}
    assert isinstance(event.context["times"], int)


def test_every_problem_is_listed_event_id_first() -> None:
    error = _problem({"event_id": "", "word": "hi", "colour": 1})

    assert str(error).endswith("(and 1 more problem)")
    assert [field["field"] for field in error.fields] == ["event_id", "colour"]


def test_json_lines_name_the_bad_line() -> None:
    with pytest.raises(InvalidEvent) as caught:
        read_events(TYPED, '{"event_id": "a", "word": "x"}\n\n{"event_id": "b", "wrd": "x"}\n')

    assert str(caught.value).startswith("line 3: ")


def test_a_payload_is_a_mapping_or_an_instance_of_the_model_without_event_id() -> None:
    by_mapping = payload_event(TYPED, {"word": "hi", "times": 2}, event_id="e1")
    by_model = payload_event(TYPED, Word(word="hi", times=2), event_id="e1")

    assert by_mapping == by_model
    with pytest.raises(InvalidEvent, match="event_id: not part of the payload"):
        payload_event(TYPED, {"word": "hi", "event_id": "e1"}, event_id="e1")


class _Loose(BaseModel):
    word: str


class _WithEventId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str
    word: str


class _Other(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Loose, "must reject unknown fields"),
        (_WithEventId, "event_id is not part of the input"),
        (_Other, "names fields \\['word'\\]"),
    ],
)
def test_an_input_model_that_would_let_bad_input_through_is_refused(
    model: type[BaseModel], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline(
            name="refused",
            steps=[Step("count", count, key="refused:{word}:count")],
            resources=lambda _settings: None,
            input=model,
        )


def test_an_untyped_event_needs_the_fields_its_keys_name() -> None:
    # `toy` has no input model: any object, but its keys are `toy:{word}:…`.
    from tests.toy_pipeline import toy

    with pytest.raises(InvalidEvent) as caught:
        read_event(toy, {"event_id": "e1", "colour": "red"}, line=3)  # type: ignore[arg-type]

    assert str(caught.value) == "line 3: word: Field required (step 'measure''s key names it)"
    assert read_event(toy, {"event_id": "e1", "word": "hi"}).context == {"word": "hi"}  # type: ignore[arg-type]
