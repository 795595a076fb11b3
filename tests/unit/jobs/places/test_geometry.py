"""The crawl's geometry: distances, snapping, and that plans and splits cover what they must."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.places.geometry import (
    EARTH_RADIUS_M,
    SPLIT_FACTOR,
    Circle,
    destination,
    distance_m,
    plan,
    snapped,
    split,
)

latitudes = st.floats(min_value=-89.0, max_value=89.0)
longitudes = st.floats(min_value=-180.0, max_value=180.0)
radii = st.floats(min_value=1.0, max_value=50_000.0)
bearings = st.floats(min_value=0.0, max_value=360.0)
#: Where a point lies between the centre (0) and the edge (1); the edge itself is drawn often.
fractions = st.one_of(st.just(1.0), st.floats(min_value=0.0, max_value=1.0))


@st.composite
def circles(draw: st.DrawFn) -> Circle:
    return Circle(draw(latitudes), draw(longitudes), draw(radii))


def _point_in(circle: Circle, bearing: float, fraction: float) -> tuple[float, float]:
    # A micrometre inside the edge at most: floats of degrees carry nanometres of error.
    away = min(circle.radius_m * fraction, circle.radius_m - 1e-6)
    return destination(circle.lat, circle.lng, bearing, away)


def _covered(point: tuple[float, float], by: list[Circle]) -> bool:
    return any(circle.contains(*point) for circle in by)


def test_a_degree_of_latitude_is_the_sphere_s_arc() -> None:
    assert distance_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(math.pi * EARTH_RADIUS_M / 180)
    assert distance_m(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343_900, rel=1e-3)
    assert distance_m(10.0, 179.9, 10.0, -179.9) == pytest.approx(distance_m(10, 0, 10, 0.2))


@given(lat=latitudes, lng=longitudes, bearing=bearings, away=st.floats(0.0, 100_000.0))
def test_destination_is_at_the_distance_asked(
    lat: float, lng: float, bearing: float, away: float
) -> None:
    to_lat, to_lng = destination(lat, lng, bearing, away)

    assert -180.0 <= to_lng < 180.0
    assert distance_m(lat, lng, to_lat, to_lng) == pytest.approx(away, abs=1e-3)


@given(circle=circles(), bearing=bearings, fraction=fractions)
def test_a_snapped_circle_contains_the_exact_one_and_snapping_again_changes_nothing(
    circle: Circle, bearing: float, fraction: float
) -> None:
    snap = snapped(circle.lat, circle.lng, circle.radius_m)

    assert snap.contains(*_point_in(circle, bearing, fraction))
    assert snapped(snap.lat, snap.lng, snap.radius_m) == snap
    assert snap.key() == f"{snap.lat:.7f},{snap.lng:.7f},{snap.radius_m:.2f}"


@settings(max_examples=300)
@given(parent=circles(), bearing=bearings, fraction=fractions)
def test_every_point_of_a_split_circle_lies_in_a_child(
    parent: Circle, bearing: float, fraction: float
) -> None:
    children = split(parent, min_radius_m=0.5)

    assert len(children) == 7
    assert all(
        parent.radius_m * SPLIT_FACTOR - 0.03 < child.radius_m <= parent.radius_m * SPLIT_FACTOR
        for child in children
    )
    assert _covered(_point_in(parent, bearing, fraction), children)


@settings(max_examples=200)
@given(
    parent=circles(),
    area_bearing=bearings,
    area_away=st.floats(0.0, 2.0),
    area_scale=st.floats(0.05, 5.0),
    bearing=bearings,
    fraction=fractions,
)
def test_children_outside_the_area_are_dropped_yet_the_area_stays_covered(
    parent: Circle,
    area_bearing: float,
    area_away: float,
    area_scale: float,
    bearing: float,
    fraction: float,
) -> None:
    centre = destination(parent.lat, parent.lng, area_bearing, parent.radius_m * area_away)
    area = Circle(*centre, parent.radius_m * area_scale)
    point = _point_in(parent, bearing, fraction)

    children = split(parent, min_radius_m=0.5, area=area)

    assert all(child.intersects(area) for child in children)
    if area.contains(*point):
        assert _covered(point, children)


@settings(max_examples=150)
@given(
    area=circles(),
    ratio=st.floats(1.0, 12.0),
    bearing=bearings,
    fraction=fractions,
)
def test_a_plan_covers_its_area_with_circles_no_larger_than_asked(
    area: Circle, ratio: float, bearing: float, fraction: float
) -> None:
    max_radius = area.radius_m / ratio

    circles_ = plan(area, max_radius_m=max_radius)

    assert all(circle.radius_m <= max_radius for circle in circles_)
    assert _covered(_point_in(area, bearing, fraction), circles_)


def test_a_small_area_is_planned_as_itself_and_plans_are_the_same_each_time() -> None:
    area = Circle(48.8566, 2.3522, 5_000.0)

    assert plan(area, max_radius_m=5_000.0) == [area]
    assert len(plan(Circle(48.85661234, 2.3522, 50_000.0), max_radius_m=50_000.0)) == 7
    assert plan(area, max_radius_m=1_000.0) == plan(area, max_radius_m=1_000.0)
    assert 30 <= len(plan(area, max_radius_m=1_000.0)) <= 45


def test_a_circle_whose_children_would_be_too_small_is_saturated() -> None:
    circle = Circle(48.8566, 2.3522, 100.0)

    assert split(circle, min_radius_m=56.0) == []
    assert len(split(circle, min_radius_m=50.0)) == 7


@pytest.mark.parametrize(
    ("lat", "lng", "radius_m", "wrong"),
    [(91.0, 0.0, 1.0, "lat"), (0.0, -181.0, 1.0, "lng"), (0.0, 0.0, 0.0, "radius_m")],
)
def test_a_circle_outside_the_world_is_refused_naming_the_field(
    lat: float, lng: float, radius_m: float, wrong: str
) -> None:
    with pytest.raises(ValueError, match=wrong):
        Circle(lat, lng, radius_m)


def test_split_refuses_a_minimum_radius_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="min_radius_m"):
        split(Circle(0.0, 0.0, 10.0), min_radius_m=0.0)
