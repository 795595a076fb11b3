"""The places-crawl pipeline's pure parts: its event (validated strictly, errors naming the
field), its items' identity (circle and category, never position) and its keys."""

from __future__ import annotations

import json

import pytest

from jobs.errors import InvalidEvent
from jobs.events import read_events
from jobs.maps import Expand, MapStep
from jobs.pipelines import Pipeline, StepContext, registry
from jobs.places import PLACES_CRAWL, places_crawl
from jobs.places.geometry import SPLIT_FACTOR, Circle, plan, split
from jobs.places.steps import (
    MIN_RADIUS_M,
    PLAN_RADIUS_M,
    item_id,
    new_item,
    plan_circles,
    search_items,
    searched,
)
from jobs.provider import ProviderClient
from ledger import JSON

#: Planning and listing items call no provider: a client nothing answers.
UNUSED = ProviderClient(base_url="http://127.0.0.1:9", timeout=0.1)


def crawl_event(**overrides: JSON) -> dict[str, JSON]:
    event: dict[str, JSON] = {
        "event_id": "crawl-1",
        "crawl_id": "paris-1",
        "lat": 48.5868,
        "lng": 2.1891,
        "radius_m": 3000,
        "categories": ["hotel", "museum"],
    }
    return {**event, **overrides}


def problem(event: dict[str, JSON]) -> str:
    pipeline: Pipeline[object] = registry.get(PLACES_CRAWL)
    with pytest.raises(InvalidEvent) as caught:
        read_events(pipeline, json.dumps(event))
    return str(caught.value)


# --- the event ----------------------------------------------------------------------------


def test_a_crawl_event_is_read_into_the_job_context() -> None:
    [event] = read_events(registry.get(PLACES_CRAWL), json.dumps(crawl_event()))

    assert event.event_id == "crawl-1"
    assert event.context == {
        "crawl_id": "paris-1",
        "lat": 48.5868,
        "lng": 2.1891,
        "radius_m": 3000.0,
        "categories": ["hotel", "museum"],
    }


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lat": 91.0}, "lat: Input should be less than or equal to 90"),
        ({"lng": "2.3"}, "lng: Input should be a valid number"),
        ({"radius_m": 0}, "radius_m: Input should be greater than 0"),
        ({"radius_m": 50_001}, "radius_m: Input should be less than or equal to 50000"),
        ({"categories": []}, "categories: List should have at least 1 item"),
        ({"categories": [f"c{n}" for n in range(11)]}, "categories: List should have at most 10"),
        ({"categories": ["museum", "museum"]}, "categories: museum given more than once"),
        ({"categories": ["Museum"]}, "categories[0]: String should match pattern"),
        ({"crawl_id": "a/b"}, "crawl_id: String should match pattern"),
        ({"crawl_id": ""}, "crawl_id: String should match pattern"),
        ({"area": "paris"}, "area: unknown field"),
    ],
)
def test_a_bad_crawl_event_is_refused_naming_the_field(
    overrides: dict[str, JSON], named: str
) -> None:
    assert named in problem(crawl_event(**overrides))


def test_a_missing_field_is_named() -> None:
    event = crawl_event()
    del event["categories"]

    assert problem(event) == "categories: Field required"


# --- the pipeline -------------------------------------------------------------------------


def test_the_pipeline_is_registered_with_keys_from_the_crawl_id() -> None:
    assert registry.get(PLACES_CRAWL) is places_crawl
    job = places_crawl.new_job("e", {"crawl_id": "paris-1"})

    assert [step.name for step in places_crawl.steps] == ["plan", "search", "publish"]
    assert isinstance(places_crawl.step("search"), MapStep)
    assert job.step_keys == {
        "plan": "crawl:paris-1:plan",
        "search": "crawl:paris-1:search",
        "publish": "crawl:paris-1:dataset",
    }


def _context() -> dict[str, JSON]:
    [event] = read_events(registry.get(PLACES_CRAWL), json.dumps(crawl_event()))
    return event.context


def test_plan_covers_the_area_with_circles_no_larger_than_the_plan_radius() -> None:
    ctx = StepContext("j", PLACES_CRAWL, "plan", "k", 1, _context(), {}, UNUSED)

    planned = plan_circles(ctx)

    assert isinstance(planned, dict)
    assert isinstance(planned["circles"], list)
    circles = [Circle(**circle) for circle in planned["circles"]]  # type: ignore[arg-type]
    assert len(circles) == 7
    assert all(circle.radius_m <= PLAN_RADIUS_M for circle in circles)


def test_the_first_items_are_every_planned_circle_times_every_category() -> None:
    context = _context()
    planned = plan_circles(StepContext("j", PLACES_CRAWL, "plan", "k", 1, context, {}, UNUSED))
    ctx = StepContext("j", PLACES_CRAWL, "search", "k", 1, context, {"plan": planned}, UNUSED)

    items = search_items(ctx)

    assert isinstance(items, list)
    assert len(items) == 14
    assert len({item_id(item) for item in items}) == 14


# --- item identity ------------------------------------------------------------------------


def test_an_items_id_is_its_category_and_its_circles_key() -> None:
    circle = Circle(48.5868, 2.1891, 2500.0)

    assert item_id(new_item(circle, "museum", 0)) == "museum@48.5868000,2.1891000,2500.00"


def test_the_same_circle_and_category_is_one_item_wherever_it_comes_from() -> None:
    # Built from other floats (an int, a JSON round trip), listed in another order, at
    # another position of the map: the same identity, so the same key and one query.
    circle = Circle(48.5868, 2.1891, 2500.0)
    first = new_item(circle, "museum", 0)
    again: JSON = json.loads(json.dumps({"category": "museum", **circle.to_json(), "level": 0}))

    assert item_id(again) == item_id(first)
    step = places_crawl.step("search")
    assert isinstance(step, MapStep)
    added = step.new_items(PLACES_CRAWL, "crawl:paris-1:search", [first, again, first])
    assert [each.item_id for each in added] == [item_id(first)]
    assert added[0].key == f"crawl:paris-1:search/{item_id(first)}"


def test_another_category_or_circle_is_another_item() -> None:
    circle = Circle(48.5868, 2.1891, 2500.0)
    ids = {
        item_id(new_item(circle, "museum", 0)),
        item_id(new_item(circle, "hotel", 0)),
        item_id(new_item(Circle(48.5868, 2.1891, 2500.01), "museum", 0)),
        item_id(new_item(Circle(48.5868001, 2.1891, 2500.0), "museum", 0)),
    }

    assert len(ids) == 4


def test_a_split_circles_children_are_items_with_their_own_identity() -> None:
    area = Circle(48.5868, 2.1891, 3000.0)
    parent = Circle(48.5868, 2.1891, 2500.0)
    children = split(parent, min_radius_m=MIN_RADIUS_M, area=area)

    ids = [item_id(new_item(child, "museum", 1)) for child in children]

    assert len(children) == 7
    assert len(set(ids)) == 7
    assert item_id(new_item(parent, "museum", 0)) not in ids
    # The same split again (a redelivered item) gives the same ids: nothing new is added.
    again = split(parent, min_radius_m=MIN_RADIUS_M, area=area)
    assert [item_id(new_item(child, "museum", 1)) for child in again] == ids


def test_a_circle_at_the_smallest_radius_does_not_split() -> None:
    tiny = Circle(48.5868, 2.1891, MIN_RADIUS_M * 1.5)

    assert split(tiny, min_radius_m=MIN_RADIUS_M) == []
    assert plan(tiny, max_radius_m=PLAN_RADIUS_M) == [tiny]


# --- what an answer makes of its item -----------------------------------------------------


def _places(count: int) -> list[JSON]:
    return [
        {"id": f"pl_{n}", "name": "x", "lat": 48.5868, "lng": 2.1891, "category": "museum"}
        for n in range(count)
    ]


AREA = Circle(48.5868, 2.1891, 3000.0)


def test_an_answer_below_the_cap_is_the_items_result() -> None:
    circle = Circle(48.5868, 2.1891, 2500.0)

    assert searched(circle, "museum", 0, _places(19), AREA) == {
        "places": _places(19),
        "level": 0,
    }


def test_a_full_answer_splits_the_circle_into_items_one_level_down() -> None:
    circle = Circle(48.5868, 2.1891, 2500.0)

    out = searched(circle, "museum", 2, _places(20), AREA)

    assert isinstance(out, Expand)
    assert out.result == {"places": _places(20), "level": 2, "split": 7}
    children = split(circle, min_radius_m=MIN_RADIUS_M, area=AREA)
    assert list(out.items) == [new_item(child, "museum", 3) for child in children]


def test_a_full_answer_at_the_smallest_radius_records_saturation_instead() -> None:
    smallest = Circle(48.5868, 2.1891, MIN_RADIUS_M / SPLIT_FACTOR - 1.0)

    out = searched(smallest, "museum", 6, _places(20), AREA)

    assert out == {"places": _places(20), "level": 6, "saturated": True}
