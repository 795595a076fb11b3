"""The places world: found by its grid as by brute force, and dense enough that crawling a
centre takes several levels of splitting. (That a seed makes the same world in another process
is tested against a real sandbox process, in tests/integration/sandbox.)"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.places import geometry
from jobs.sandbox.world import (
    CATEGORIES,
    CATEGORY_SHARES,
    CENTRES,
    DEFAULT_SEED,
    ORIGIN,
    World,
    distance_m,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(DEFAULT_SEED)


def test_places_have_unique_ids_every_category_and_about_their_shares(world: World) -> None:
    places = world.places()
    counts = Counter(place.category for place in places)

    assert len({place.id for place in places}) == len(places) > 40_000
    for category, share in CATEGORY_SHARES.items():
        assert counts[category] / len(places) == pytest.approx(share, rel=0.1)


circles = st.tuples(
    st.floats(ORIGIN[0] - 0.6, ORIGIN[0] + 0.6),
    st.floats(ORIGIN[1] - 0.9, ORIGIN[1] + 0.9),
    st.floats(1.0, 50_000.0),
    st.sampled_from((None, *CATEGORIES)),
)


@settings(max_examples=10, deadline=None)
@given(circle=circles)
def test_the_grid_finds_what_brute_force_finds(
    world: World, circle: tuple[float, float, float, str | None]
) -> None:
    lat, lng, radius, category = circle
    expected = sorted(
        (distance_m(lat, lng, place.lat, place.lng), place.id)
        for place in world.places()
        if category in (None, place.category)
        and distance_m(lat, lng, place.lat, place.lng) <= radius
    )

    found = world.within(lat, lng, radius, category)

    assert [place.id for place in found] == [place_id for _, place_id in expected]
    if category is not None:
        assert world.nearest(lat, lng, radius, category, 20) == found[:20]


@pytest.mark.parametrize(
    ("lat", "lng"), [(89.99, 0.0), (-90.0, 45.0), (0.0, 179.999), (0.0, -180.0), (10.0, 10.0)]
)
def test_far_from_the_centres_there_is_nothing(world: World, lat: float, lng: float) -> None:
    assert world.within(lat, lng, 50_000.0) == []


def test_the_sandbox_and_the_crawl_measure_the_same_distances() -> None:
    points = [(48.85, 2.35, 48.9, 2.1), (-33.9, 151.2, 51.5, -0.12), (0.0, 179.9, 0.0, -179.9)]

    for lat1, lng1, lat2, lng2 in points:
        assert distance_m(lat1, lng1, lat2, lng2) == geometry.distance_m(lat1, lng1, lat2, lng2)


def _crawl(world: World, area: geometry.Circle, category: str) -> tuple[int, set[str]]:
    """Crawl `area` as the pipeline will: split every circle that answers 20. Returns the
    deepest level of splitting and the ids found."""
    pending = [(circle, 0) for circle in geometry.plan(area, max_radius_m=area.radius_m / 2)]
    deepest, found = 0, set[str]()
    while pending:
        circle, level = pending.pop()
        answer = world.nearest(circle.lat, circle.lng, circle.radius_m, category, 20)
        found.update(place.id for place in answer)
        deepest = max(deepest, level)
        if len(answer) == 20:
            children = geometry.split(circle, min_radius_m=25.0, area=area)
            assert children, f"{circle} is saturated"
            pending.extend((child, level + 1) for child in children)
    return deepest, found


@pytest.mark.parametrize(("centre", "category"), [(3, "museum"), (4, "pharmacy")])
def test_crawling_a_town_takes_three_levels_of_splitting_and_finds_every_place(
    world: World, centre: int, category: str
) -> None:
    area = geometry.Circle(*CENTRES[centre].position(), 5_000.0)

    deepest, found = _crawl(world, area, category)

    truth = {place.id for place in world.within(area.lat, area.lng, area.radius_m, category)}
    assert deepest >= 3
    assert truth <= found
