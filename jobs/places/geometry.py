"""Circles on the Earth for the places crawl: great-circle distances, the plan's cover of an
area and the split of a full circle into smaller circles that cover it.

Units: latitudes and longitudes in decimal degrees, distances and radii in metres, bearings in
degrees clockwise from north; the Earth is a sphere of radius `EARTH_RADIUS_M`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The Earth's mean radius (IUGG), in metres: the sphere every distance here is measured on.
#: The sandbox's world (`jobs.sandbox.world`) uses the same sphere.
EARTH_RADIUS_M = 6_371_008.8

#: A child circle's radius over its parent's when a full circle is split: seven children (one
#: in the middle, six around) cover the parent with room to spare (0.5 would be exact).
SPLIT_FACTOR = 0.55

#: The hexagonal lattice of a cover is this much tighter than the tiling its circles exactly
#: cover, so float rounding can never open a gap between three neighbouring circles.
LATTICE_SLACK = 0.98

#: Decimals kept of a circle's latitude and longitude (1e-7 degree is about a centimetre).
COORDINATE_DECIMALS = 7
#: The most snapping may add to a radius, in metres: a centimetre rounding up, one for the centre.
SNAP_GROWTH_M = 0.02


@dataclass(frozen=True)
class Circle:
    """A circle on the Earth: its centre and its radius in metres.

    Circles made by `plan`, `cover` and `split` are snapped (centre rounded to
    `COORDINATE_DECIMALS`, radius rounded up to the centimetre), so `key()` is their identity
    and the same computation gives the same circles in any process.
    """

    lat: float
    lng: float
    radius_m: float

    def __post_init__(self) -> None:
        if not -90.0 <= self.lat <= 90.0:
            raise ValueError(f"lat must be within [-90, 90], got {self.lat}")
        if not -180.0 <= self.lng <= 180.0:
            raise ValueError(f"lng must be within [-180, 180], got {self.lng}")
        if not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ValueError(f"radius_m must be a positive number of metres, got {self.radius_m}")

    def contains(self, lat: float, lng: float) -> bool:
        """Tell whether the point lies in the circle (its edge included)."""
        return distance_m(self.lat, self.lng, lat, lng) <= self.radius_m

    def intersects(self, other: Circle) -> bool:
        """Tell whether the two circles share a point."""
        return distance_m(self.lat, self.lng, other.lat, other.lng) <= (
            self.radius_m + other.radius_m
        )

    def key(self) -> str:
        """Return the circle's identity as text: `lat,lng,radius_m` at the snapped precision."""
        places = COORDINATE_DECIMALS
        return f"{self.lat:.{places}f},{self.lng:.{places}f},{self.radius_m:.2f}"

    def to_json(self) -> dict[str, float]:
        """Return `{"lat", "lng", "radius_m"}`, as a places search body carries them."""
        return {"lat": self.lat, "lng": self.lng, "radius_m": self.radius_m}


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Return the great-circle distance between two points, in metres (haversine formula)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dphi = (phi2 - phi1) / 2
    half_dlambda = math.radians(lng2 - lng1) / 2
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def destination(lat: float, lng: float, bearing_deg: float, distance: float) -> tuple[float, float]:
    """Return the point `distance` metres from (lat, lng) along the great circle at `bearing_deg`.

    The longitude comes back within [-180, 180).
    """
    phi1, lambda1 = math.radians(lat), math.radians(lng)
    theta = math.radians(bearing_deg)
    delta = distance / EARTH_RADIUS_M
    sin_phi2 = math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta)
    phi2 = math.asin(max(-1.0, min(1.0, sin_phi2)))
    lambda2 = lambda1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1),
        math.cos(delta) - math.sin(phi1) * sin_phi2,
    )
    return math.degrees(phi2), _wrapped(math.degrees(lambda2))


def _wrapped(lng: float) -> float:
    # Only out-of-range longitudes are wrapped: adding 180 would cost precision (nanometres).
    return lng if -180.0 <= lng < 180.0 else (lng + 180.0) % 360.0 - 180.0


def snapped(lat: float, lng: float, radius_m: float) -> Circle:
    """Return the snapped circle that contains the given one.

    The radius is rounded up to the centimetre; the centre is rounded to `COORDINATE_DECIMALS`,
    and if that moved it (by under a centimetre) the radius grows by one more centimetre, so
    nothing the exact circle covered is lost. Snapping a snapped circle changes nothing.
    """
    lng = _wrapped(lng)
    # The epsilon keeps a radius already in centimetres (float noise aside) where it is.
    radius = math.ceil(radius_m * 100 - 1e-6) / 100
    # Rounding may carry a longitude just short of 180 to 180, which is -180.
    centre = round(lat, COORDINATE_DECIMALS), _wrapped(round(lng, COORDINATE_DECIMALS))
    if centre != (lat, lng):
        radius += 0.01
    return Circle(*centre, round(radius, 2))


def cover(area: Circle, radius_m: float) -> list[Circle]:
    """Cover `area` with circles of `radius_m` centred on a hexagonal lattice.

    The lattice is laid out in the plane of distances and bearings from the area's centre
    (azimuthal equidistant) and its points carried onto the sphere along great circles. Its
    cells are hexagons inscribed in the circles, so the circles cover the plane; on the sphere
    a point's distance to a lattice point is never longer than in that plane (a triangle with
    two sides and their angle fixed has a shorter third side on a sphere), so they cover the area.

    Args:
        area: The circle to cover.
        radius_m: The largest radius of a covering circle, in metres (the lattice is laid for
            `SNAP_GROWTH_M` less, so that snapping never makes a circle larger than asked).

    Returns:
        The snapped circles whose lattice point lies within `area.radius_m + radius_m` of the
        centre (every other circle misses the area), south to north, west to east.

    Raises:
        ValueError: If `radius_m` is not more than twice `SNAP_GROWTH_M`.
    """
    if not (math.isfinite(radius_m) and radius_m > 2 * SNAP_GROWTH_M):
        raise ValueError(f"radius_m must be more than {2 * SNAP_GROWTH_M} m, got {radius_m}")
    radius_m -= SNAP_GROWTH_M
    spacing = math.sqrt(3) * radius_m * LATTICE_SLACK
    row_height = spacing * math.sqrt(3) / 2
    reach = area.radius_m + radius_m
    rows = math.ceil(reach / row_height)
    columns = math.ceil(reach / spacing) + 1
    circles: list[Circle] = []
    for row in range(-rows, rows + 1):
        for column in range(-columns, columns + 1):
            east, north = (column + row / 2) * spacing, row * row_height
            away = math.hypot(east, north)
            if away > reach:
                continue
            if away == 0:
                lat, lng = area.lat, area.lng
            else:
                bearing = math.degrees(math.atan2(east, north))
                lat, lng = destination(area.lat, area.lng, bearing, away)
            circles.append(snapped(lat, lng, radius_m))
    return circles


def plan(area: Circle, *, max_radius_m: float) -> list[Circle]:
    """Return the initial circles of a crawl of `area`: none larger than `max_radius_m`.

    The area itself (snapped) when it is small enough, else its `cover` by circles of
    `max_radius_m`.
    """
    whole = snapped(area.lat, area.lng, area.radius_m)
    if whole.radius_m <= max_radius_m:
        return [whole]
    return cover(area, max_radius_m)


def split(circle: Circle, *, min_radius_m: float, area: Circle | None = None) -> list[Circle]:
    """Return the children of a full circle: seven circles of `SPLIT_FACTOR` its radius (at most).

    Every point of `circle` (of `circle` within `area`, if given) lies in some child. Children
    that miss `area` are left out: what they would find is outside the crawl.

    Args:
        circle: The circle that answered a full page.
        min_radius_m: The smallest radius worth searching, in metres.
        area: The crawl's area, if children outside it should be dropped.

    Returns:
        The children; empty when they would be smaller than `min_radius_m`: the circle is
        saturated (it may hold more places than one search can answer, and that is recorded
        rather than split forever).

    Raises:
        ValueError: If `min_radius_m` is not positive.
    """
    if not (math.isfinite(min_radius_m) and min_radius_m > 0):
        raise ValueError(f"min_radius_m must be a positive number of metres, got {min_radius_m}")
    child_radius = circle.radius_m * SPLIT_FACTOR
    # Below a few centimetres snapping leaves no room for a circle: saturated too.
    if child_radius < min_radius_m or child_radius <= 2 * SNAP_GROWTH_M:
        return []
    children = cover(circle, child_radius)
    if area is not None:
        children = [child for child in children if child.intersects(area)]
    return children
