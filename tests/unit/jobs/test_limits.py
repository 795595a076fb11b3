"""`jobs.limits`: declaring limits on a step (and a map step's items), their key templates,
and `ONCELERY_LIMITS`: a bad value fails at start naming the variable and what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict

from config import ConfigError, Settings, child_environment, load_settings
from jobs import ConcurrencyLimit, MapStep, Pipeline, RateLimit, Sleep, Step, WaitForSignal
from jobs.engine.runtime import Runtime, check_configured_limits, load_pipelines
from jobs.limits import RATE_SLACK, parse_key, rules_of
from ledger import KeySource, LimitRules, create_engine
from ledger.limit_types import render_key
from tests.conftest import REPO_ROOT


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str
    customer_id: str


def _noop(_: object) -> None:
    return None


def _step(name: str = "charge", **kwargs: object) -> Step[None]:
    return Step(name, _noop, key="order:{order_id}:" + name, **kwargs)  # type: ignore[arg-type]


def _map(**kwargs: object) -> MapStep[None]:
    return MapStep(
        "search",
        _noop,
        key="order:{order_id}:search",
        each=_noop,
        item_id=str,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_key_template_is_text_and_context_fields() -> None:
    assert parse_key("customer:{customer_id}", items=False) == (
        (KeySource.TEXT, "customer:"),
        (KeySource.CONTEXT, "customer_id"),
    )
    assert parse_key("provider:places", items=False) == ((KeySource.TEXT, "provider:places"),)
    assert parse_key("{{literal}}:{item[category]}", items=True) == (
        (KeySource.TEXT, "{literal}:"),
        (KeySource.ITEM, "category"),
    )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("", "non-empty"),
        ("c:{customer_id!r}", "no format or conversion"),
        ("c:{customer_id:>5}", "no format or conversion"),
        ("c:{}", "not a context field"),
        ("c:{0}", "not a context field"),
        ("c:{customer.id}", "not a context field"),
        ("c:{item[category]}", "is for a map step's items"),
        ("c:{customer_id", "key template"),
    ],
)
def test_a_bad_key_template_is_refused_saying_why(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_key(template, items=False)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RateLimit("p", 0),
        lambda: RateLimit("p", -1),
        lambda: RateLimit("p", float("nan")),
        lambda: RateLimit("p", float("inf")),
        lambda: RateLimit("p", 5, burst=0),
        lambda: ConcurrencyLimit("p", 0),
        lambda: ConcurrencyLimit("p", True),
    ],
)
def test_non_positive_numbers_are_refused(build: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        build()  # type: ignore[operator]


def test_a_step_takes_one_limit_of_each_kind() -> None:
    step = _step(limits=[RateLimit("p", 5), ConcurrencyLimit("customer:{customer_id}", 1)])
    assert len(step.limits) == 2
    with pytest.raises(ValueError, match="one RateLimit per step"):
        _step(limits=[RateLimit("p", 5), RateLimit("q", 5)])
    with pytest.raises(ValueError, match="takes RateLimit and ConcurrencyLimit"):
        _step(limits=["p"])


def test_an_item_field_is_for_a_map_steps_items_and_a_wait_takes_none() -> None:
    with pytest.raises(ValueError, match=r"step 'charge': key template .* is for a map step's"):
        _step(limits=[RateLimit("p:{item[category]}", 5)])
    assert _map(limits=[RateLimit("p:{item[category]}", 5)]).limits
    with pytest.raises(ValueError, match="takes no limits"):
        Sleep("cool_off", seconds=1, limits=[RateLimit("p", 1)])
    with pytest.raises(ValueError, match="wait step 'shipped': a wait takes no limits"):
        WaitForSignal(
            "shipped", signal="shipped", key="{id}", timeout=1, limits=[RateLimit("p", 1)]
        )


def test_a_pipeline_refuses_limits_naming_fields_its_input_lacks() -> None:
    with pytest.raises(ValueError, match=r"limits name fields \['tenant'\]"):
        Pipeline(
            name="limits-test-bad-field",
            steps=[_step(limits=[ConcurrencyLimit("t:{tenant}", 1)])],
            resources=lambda _: None,
            input=Order,
        )


def test_the_ledger_rules_space_tokens_a_little_wider_than_the_rate() -> None:
    rules = rules_of(
        [RateLimit("provider:{item[kind]}", 50, burst=3), ConcurrencyLimit("c:{customer_id}", 2)],
        items=True,
    )
    assert rules is not None
    assert rules.rate is not None
    assert rules.slots is not None
    assert rules.rate.interval == pytest.approx((1 + RATE_SLACK) / 50)
    assert rules.rate.tolerance == pytest.approx(2 * rules.rate.interval)
    assert rules.slots.limit == 2
    assert rules.render({"customer_id": "c7"}, {"kind": "places"}) == ("provider:places", "c:c7")
    assert rules_of([], items=False) is None


def test_a_key_renders_strings_as_they_are_and_other_values_as_json() -> None:
    key = parse_key("a:{x}:{y}:{z}", items=False)
    assert render_key(key, {"x": "s", "y": 12, "z": None}, None) == "a:s:12:"
    assert render_key(key, {"x": True, "y": [1, 2]}, None) == "a:true:[1, 2]:"


def test_limits_in_the_settings_are_parsed_with_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ONCELERY_LIMITS",
        '{"places-crawl.search": {"rate": {"key": "provider:places", "per_second": 50}},'
        ' "order-placed.act": {"concurrency": {"key": "customer:{customer_id}", "limit": 1}}}',
    )
    limits = load_settings().limits
    assert limits["places-crawl.search"].rate is not None
    assert limits["places-crawl.search"].rate.per_second == 50
    concurrency = limits["order-placed.act"].concurrency
    assert concurrency is not None
    assert concurrency.limit == 1


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{not json", "not JSON"),
        ('{"order-placed.act": {"rate": {"key": "p", "per_second": 0}}}', "greater than 0"),
        ('{"order-placed.act": {"concurrency": {"key": "c", "limit": -1}}}', "greater than"),
        ('{"order-placed.act": {"speed": {"key": "c"}}}', "Extra inputs"),
        ('{"order-placed.act": {"rate": {"per_second": 5}}}', "Field required"),
    ],
)
def test_a_bad_limits_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("ONCELERY_LIMITS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.variable == "ONCELERY_LIMITS"
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"order-placed.shipping": {"concurrency": {"key": "c", "limit": 1}}}', "no such step"),
        ('{"no-such.act": {"concurrency": {"key": "c", "limit": 1}}}', "no such step"),
        ('{"act": {"concurrency": {"key": "c", "limit": 1}}}', "no such step"),
        (
            '{"order-placed.act": {"concurrency": {"key": "t:{tenant}", "limit": 1}}}',
            "names fields ['tenant']",
        ),
        (
            '{"order-placed.act": {"rate": {"key": "t:{item[x]}", "per_second": 1}}}',
            "is for a map step's items",
        ),
        (
            '{"order-placed.act": {"rate": {"key": "t:{x!r}", "per_second": 1}}}',
            "no format or conversion",
        ),
    ],
)
def test_limits_for_a_step_that_cannot_take_them_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    load_pipelines(Settings())
    monkeypatch.setenv("ONCELERY_LIMITS", value)
    settings = load_settings()
    with pytest.raises(ConfigError) as caught:
        check_configured_limits(settings)
    assert caught.value.variable == "ONCELERY_LIMITS"
    assert problem in caught.value.problem


def test_the_settings_replace_a_steps_own_limit_of_the_same_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "ONCELERY_LIMITS",
        '{"limits-test-own.charge": {"rate": {"key": "p", "per_second": 10, "burst": 2}}}',
    )
    step = _step(limits=[RateLimit("q", 1), ConcurrencyLimit("customer:{customer_id}", 1)])
    Pipeline(name="limits-test-own", steps=[step], resources=lambda _: None, input=Order)
    rt = Runtime.from_settings(load_settings(), engine=create_engine("sqlite://"))
    rules = rt.limits_for("limits-test-own", step)  # type: ignore[arg-type]
    assert isinstance(rules, LimitRules)
    assert rules.rate is not None
    assert rules.slots is not None
    assert (rules.rate.template, rules.rate.burst) == ("p", 2)
    assert rules.slots.template == "customer:{customer_id}"


def test_the_cli_exits_2_with_one_line_naming_the_variable() -> None:
    env = child_environment(
        {
            "ONCELERY_LIMITS": '{"order-placed.shipping": {"rate": {"key": "c", "per_second": 1}}}',
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "history", "00000000-0000-0000-0000-000000000000"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: ONCELERY_LIMITS: order-placed.shipping: no such step (expected <pipeline>.<step>)"
    ]


def test_limits_for_a_wait_step_are_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    nap: Sleep[None] = Sleep("nap", seconds=1)
    Pipeline(name="limits-test-nap", steps=[_step(), nap], resources=lambda _: None)
    monkeypatch.setenv(
        "ONCELERY_LIMITS", '{"limits-test-nap.nap": {"rate": {"key": "p", "per_second": 1}}}'
    )
    with pytest.raises(ConfigError, match="a wait step takes no limits"):
        check_configured_limits(load_settings())
