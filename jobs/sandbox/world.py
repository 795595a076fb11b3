"""The world the sandbox's places search answers from: synthetic, the same for the same seed in
any process, dense in a few centres and sparse around them, indexed on a grid of cells.

Units: decimal degrees, metres; distances are great-circle (haversine) on a sphere of radius
`EARTH_RADIUS_M`, the same sphere as `jobs.places.geometry` (the sandbox imports none of it).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
import random
from dataclasses import dataclass

#: The Earth's mean radius (IUGG), in metres.
EARTH_RADIUS_M = 6_371_008.8
#: Metres in one degree of latitude (and of longitude on the equator).
METRES_PER_DEGREE = math.pi * EARTH_RADIUS_M / 180

#: The seed of the world when none is given (`oncelery sandbox --places-seed`).
DEFAULT_SEED = 1
#: Where the world is: the first centre, whatever the seed. Other centres are placed from it.
ORIGIN = (48.8566, 2.3522)

#: Each category with its share of the places.
CATEGORY_SHARES: dict[str, float] = {
    "restaurant": 0.32,
    "cafe": 0.22,
    "bar": 0.14,
    "bakery": 0.10,
    "pharmacy": 0.09,
    "hotel": 0.08,
    "museum": 0.05,
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_SHARES)

_LABELS = {
    "restaurant": "Bistro",
    "cafe": "Café",
    "bar": "Bar",
    "bakery": "Bakery",
    "pharmacy": "Pharmacy",
    "hotel": "Hotel",
    "museum": "Museum",
}
_ADJECTIVES = ("Blue", "Golden", "Little", "Old", "Green", "Silver", "Quiet", "Royal")
_NOUNS = ("Fig", "Lantern", "Harbour", "Oak", "Sparrow", "Bridge", "Clock", "Garden")

#: A grid cell is 1/CELLS_PER_DEGREE of a degree of latitude by as much of longitude.
CELLS_PER_DEGREE = 100
_COLUMNS = 360 * CELLS_PER_DEGREE


@dataclass(frozen=True)
class Centre:
    """A dense spot of the world: its places scatter around it as a normal law of `sigma_m`."""

    name: str
    east_m: float
    north_m: float
    sigma_m: float
    places: int

    def position(self) -> tuple[float, float]:
        """Return the centre's latitude and longitude."""
        return _offset(self.north_m, self.east_m)


#: The dense spots, placed in metres east and north of `ORIGIN`; the seed moves their places,
#: never them. The city's middle holds ~800 places per km², so crawling it needs many splits.
CENTRES: tuple[Centre, ...] = (
    Centre("city", 0.0, 0.0, 2_000.0, 20_000),
    Centre("north district", 6_000.0, 9_000.0, 1_200.0, 8_000),
    Centre("west suburb", -18_000.0, 5_000.0, 3_000.0, 6_000),
    Centre("east town", 25_000.0, -4_000.0, 1_000.0, 3_000),
    Centre("south village", -12_000.0, -30_000.0, 600.0, 1_200),
)
#: Places spread evenly over a square of this half-width around `ORIGIN` (~0.4 per km²).
BACKGROUND_PLACES = 6_000
BACKGROUND_HALF_WIDTH_M = 60_000.0


@dataclass(frozen=True, slots=True)
class Place:
    """One place of the world."""

    id: str
    name: str
    lat: float
    lng: float
    category: str

    def to_json(self) -> dict[str, object]:
        """Return the place as the search answers it."""
        return {
            "id": self.id,
            "name": self.name,
            "lat": self.lat,
            "lng": self.lng,
            "category": self.category,
        }


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Return the great-circle distance between two points, in metres (haversine formula)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dphi = (phi2 - phi1) / 2
    half_dlambda = math.radians(lng2 - lng1) / 2
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


Cell = tuple[int, int]
#: Places by category, then by cell.
Index = dict[str, dict[Cell, list[Place]]]


class World:
    """The places of one seed, generated on first use (under a second) and kept."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        """Name the world; nothing is generated until it is asked something."""
        self.seed = seed

    def places(self) -> list[Place]:
        """Return every place, in id order."""
        found = itertools.chain.from_iterable(
            cell for cells in _index(self.seed).values() for cell in cells.values()
        )
        return sorted(found, key=lambda place: place.id)

    def within(
        self, lat: float, lng: float, radius_m: float, category: str | None = None
    ) -> list[Place]:
        """Return every place within `radius_m` of the point, nearest first (ties by id).

        Args:
            lat: The centre's latitude.
            lng: The centre's longitude.
            radius_m: The radius, in metres; a place at exactly that distance is within.
            category: Only places of this category; every category if `None`.
        """
        return [place for _, place in sorted(self._candidates(lat, lng, radius_m, category))]

    def nearest(
        self, lat: float, lng: float, radius_m: float, category: str, limit: int
    ) -> list[Place]:
        """Return the `limit` places of `category` within `radius_m` nearest the point."""
        found = heapq.nsmallest(limit, self._candidates(lat, lng, radius_m, category))
        return [place for _, place in found]

    def _candidates(
        self, lat: float, lng: float, radius_m: float, category: str | None
    ) -> list[tuple[tuple[float, str], Place]]:
        indexes = _index(self.seed)
        chosen = CATEGORIES if category is None else (category,)
        found: list[tuple[tuple[float, str], Place]] = []
        for name in chosen:
            cells = indexes.get(name, {})
            for cell in _cells_around(lat, lng, radius_m, cells):
                for place in cells.get(cell, ()):
                    away = distance_m(lat, lng, place.lat, place.lng)
                    if away <= radius_m:
                        found.append(((away, place.id), place))
        return found


@functools.cache
def _index(seed: int) -> Index:
    """The places of `seed` by category and cell, built once per process (never changed after)."""
    index: Index = {name: {} for name in CATEGORIES}
    for place in _generate(seed):
        cell = (_row(place.lat), _column(place.lng))
        index[place.category].setdefault(cell, []).append(place)
    return index


def _row(lat: float) -> int:
    return math.floor(lat * CELLS_PER_DEGREE)


def _column(lng: float) -> int:
    # Columns wrap around the antimeridian: -180 and 180 are the same column.
    return (math.floor(lng * CELLS_PER_DEGREE) + _COLUMNS // 2) % _COLUMNS - _COLUMNS // 2


def _cells_around(
    lat: float, lng: float, radius_m: float, occupied: dict[Cell, list[Place]]
) -> list[Cell]:
    """The cells that may hold points within `radius_m` of (lat, lng): those of the circle's
    bounding box, or the occupied ones inside it when there are fewer of those to look at."""
    delta = radius_m / EARTH_RADIUS_M
    dlat = math.degrees(delta)
    # A hair of margin: the bounding box is exact, the floats that compute it are not.
    margin = 1e-6
    rows = range(_row(lat - dlat - margin), _row(lat + dlat + margin) + 1)
    # A circle's longitudes span asin(sin δ / cos φ) either side of its centre, unless it
    # holds a pole: then every longitude.
    reach = math.sin(delta) / max(math.cos(math.radians(lat)), 1e-12)
    if lat + dlat >= 90.0 or lat - dlat <= -90.0 or delta >= math.pi / 2 or reach >= 1.0:
        return [cell for cell in occupied if cell[0] in rows]
    dlng = math.degrees(math.asin(reach))
    first = math.floor((lng - dlng - margin) * CELLS_PER_DEGREE)
    last = math.floor((lng + dlng + margin) * CELLS_PER_DEGREE)
    half = _COLUMNS // 2
    columns = {(column + half) % _COLUMNS - half for column in range(first, last + 1)}
    if len(rows) * len(columns) > len(occupied):
        return [cell for cell in occupied if cell[0] in rows and cell[1] in columns]
    return [(row, column) for row in rows for column in columns]


def _offset(north_m: float, east_m: float) -> tuple[float, float]:
    """The point `north_m` north and `east_m` east of `ORIGIN` (a flat map: fine for a world
    made up, whose distances are measured on the sphere anyway)."""
    lat = ORIGIN[0] + north_m / METRES_PER_DEGREE
    return lat, ORIGIN[1] + east_m / (METRES_PER_DEGREE * math.cos(math.radians(lat)))


def _generate(seed: int) -> list[Place]:
    """Every place of the world of `seed`: the centres' crowds, then the background."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(CATEGORY_SHARES.values()))
    places: list[Place] = []

    def add(north_m: float, east_m: float) -> None:
        lat, lng = _offset(north_m, east_m)
        share = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        category = CATEGORIES[min(share, len(CATEGORIES) - 1)]
        adjective, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
        places.append(
            Place(
                id=f"pl_{len(places):06d}",
                name=f"{adjective} {noun} {_LABELS[category]}",
                lat=round(lat, 6),
                lng=round(lng, 6),
                category=category,
            )
        )

    for centre in CENTRES:
        for _ in range(centre.places):
            add(
                centre.north_m + rng.gauss(0.0, centre.sigma_m),
                centre.east_m + rng.gauss(0.0, centre.sigma_m),
            )
    for _ in range(BACKGROUND_PLACES):
        half = BACKGROUND_HALF_WIDTH_M
        add(rng.uniform(-half, half), rng.uniform(-half, half))
    return places
