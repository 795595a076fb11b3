"""`jobs.pipelines`: declaring a pipeline, its steps' keys, the context fingerprint, and the
registry."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config import Settings
from jobs.errors import UnknownPipeline
from jobs.pipelines import (
    Delivery,
    Pipeline,
    PipelineRegistry,
    Step,
    StepContext,
    fingerprint,
    registry,
)
from ledger import JSON


def _noop(ctx: StepContext[None]) -> JSON:
    return ctx.step


def _no_resources(_settings: Settings) -> None:
    return None


def _steps(*names: str) -> list[Step[None]]:
    return [Step(name, _noop, key=f"thing:{{thing_id}}:{name}") for name in names]


@pytest.fixture
def name() -> str:
    """A pipeline name no other test uses: constructing a `Pipeline` registers it process-wide
    (and binds Celery tasks for it), so every pipeline here has a name of its own."""
    return f"unit-{uuid.uuid4().hex[:10]}"


# --- keys -----------------------------------------------------------------------------------


def test_a_key_template_is_filled_from_the_context() -> None:
    step: Step[None] = Step("charge", _noop, key="order:{order_id}:{kind}")

    assert step.key_for({"order_id": "ord-1", "kind": "charge", "extra": True}) == (
        "order:ord-1:charge"
    )
    assert step.key_for({"order_id": 42, "kind": "x"}) == "order:42:x"


def test_literal_braces_are_not_fields() -> None:
    step: Step[None] = Step("s", _noop, key="t:{{raw}}:{id}")

    assert step.key_for({"id": 7}) == "t:{raw}:7"


def test_a_missing_context_field_is_named() -> None:
    step: Step[None] = Step("charge", _noop, key="order:{order_id}:{kind}:charge")

    with pytest.raises(KeyError) as caught:
        step.key_for({"customer_id": "c-1"})

    assert caught.value.args == (
        "key template 'order:{order_id}:{kind}:charge' needs context fields ['kind', 'order_id']",
    )


def test_a_callable_key_receives_the_context() -> None:
    def key(context: Mapping[str, JSON]) -> str:
        return f"refund:{context['order_id']}:{context['attempt']}"

    step: Step[None] = Step("refund", _noop, key=key)

    assert step.key_for({"order_id": "ord-9", "attempt": 2}) == "refund:ord-9:2"


def test_step_defaults() -> None:
    step: Step[None] = Step("s", _noop, key="k")

    assert step.delivery is Delivery.EXACTLY_ONCE
    assert (step.effect, step.retry) == (None, None)
    assert [str(delivery) for delivery in Delivery] == ["exactly_once", "at_most_once", "read_only"]


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf"), 3_601.0])
def test_a_step_whose_time_limit_cannot_bound_it_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="time_limit"):
        Step("s", _noop, key="k", time_limit=limit)


# --- declaring a pipeline -------------------------------------------------------------------


def test_a_pipeline_registers_itself(name: str) -> None:
    pipeline = Pipeline(name=name, steps=_steps("a", "b"), resources=_no_resources)

    assert registry.get(name) is pipeline


def test_redeclaring_a_name_replaces_the_pipeline(name: str) -> None:
    Pipeline(name=name, steps=_steps("a"), resources=_no_resources)
    second = Pipeline(name=name, steps=_steps("a", "b"), resources=_no_resources)

    assert registry.get(name) is second


def test_duplicate_step_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="has two steps with the same name"):
        Pipeline(name=name, steps=_steps("a", "b", "a"), resources=_no_resources)

    with pytest.raises(UnknownPipeline):
        registry.get(name)


def test_an_empty_pipeline_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="has no steps"):
        Pipeline(name=name, steps=[], resources=_no_resources)

    with pytest.raises(UnknownPipeline):
        registry.get(name)


def test_steps_by_name_and_in_order(name: str) -> None:
    pipeline = Pipeline(
        name=name, steps=_steps("gather", "act", "publish"), resources=_no_resources
    )

    assert pipeline.step("act").name == "act"
    assert pipeline.next_step("gather") is pipeline.step("act")
    assert pipeline.next_step("act") is pipeline.step("publish")
    assert pipeline.next_step("publish") is None
    with pytest.raises(KeyError):
        pipeline.step("refund")


def test_new_job_plans_every_step(name: str) -> None:
    pipeline = Pipeline(name=name, steps=_steps("first", "second"), resources=_no_resources)
    context: dict[str, JSON] = {"thing_id": "t-1", "size": 3}

    job = pipeline.new_job("evt-1", context)

    assert job.pipeline == name
    assert job.event_id == "evt-1"
    assert job.context == context
    assert job.fingerprint == fingerprint(name, context)
    assert dict(job.step_keys) == {"first": "thing:t-1:first", "second": "thing:t-1:second"}
    assert job.first_step == "first"


def test_new_job_with_a_context_missing_a_key_field(name: str) -> None:
    pipeline = Pipeline(name=name, steps=_steps("first"), resources=_no_resources)

    with pytest.raises(KeyError, match="thing_id"):
        pipeline.new_job("evt-1", {"size": 3})


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_the_sha256_of_canonical_json() -> None:
    assert fingerprint("toy", {"word": "hi", "n": [1, 2]}) == (
        "ed68807fc79d088610ffc039f0e65d544c37f5b0809f7a1b2c51a1543f80b59f"
    )


def test_fingerprint_depends_on_the_pipeline() -> None:
    assert fingerprint("a", {"x": 1}) != fingerprint("b", {"x": 1})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


def _reversed(value: JSON) -> JSON:
    """The same JSON with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {key: _reversed(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed(item) for item in value]
    return value


@hypothesis_settings(max_examples=200, deadline=None)
@given(context=st.dictionaries(st.text(max_size=8), _json, max_size=6))
def test_fingerprint_ignores_key_order(context: dict[str, JSON]) -> None:
    shuffled = _reversed(context)
    assert isinstance(shuffled, dict)

    value = fingerprint("p", context)

    assert value == fingerprint("p", shuffled)
    assert len(value) == 64
    assert set(value) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    ("one", "two"),
    [
        ({"x": 1}, {"x": 2}),
        ({"x": 1}, {"x": True}),
        ({"x": [1, 2]}, {"x": [2, 1]}),
        ({"x": 1}, {"x": 1, "y": None}),
        ({"x": "1"}, {"x": 1}),
    ],
)
def test_fingerprint_tells_contexts_apart(one: dict[str, JSON], two: dict[str, JSON]) -> None:
    assert fingerprint("p", one) != fingerprint("p", two)


# --- the registry ---------------------------------------------------------------------------


def test_an_unknown_pipeline_is_named() -> None:
    with pytest.raises(UnknownPipeline) as caught:
        registry.get("unit-never-declared")

    assert caught.value.name == "unit-never-declared"
    assert str(caught.value) == "no pipeline named 'unit-never-declared' is declared"


def test_listeners_hear_of_every_pipeline_past_and_future(name: str) -> None:
    own = PipelineRegistry()
    earlier = Pipeline(name=f"{name}-a", steps=_steps("s"), resources=_no_resources)
    later = Pipeline(name=f"{name}-b", steps=_steps("s"), resources=_no_resources)
    heard: list[str] = []
    own.add(earlier)

    own.on_add(lambda pipeline: heard.append(pipeline.name))
    own.add(later)

    assert heard == [f"{name}-a", f"{name}-b"]
    assert [pipeline.name for pipeline in own] == [f"{name}-a", f"{name}-b"]
