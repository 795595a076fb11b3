"""The places search and datasets the sandbox plays: request bodies, answers, and the rate cap.

Answers are pure functions of the request and the world (dataset ids aside); the rate cap
keeps the only clock.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .services import Reply
from .store import EffectKind, NewEffect
from .world import CATEGORIES, World

#: The most places one search answers; it never says whether there are more.
MAX_RESULTS = 20
#: The largest radius a search accepts, in metres.
MAX_SEARCH_RADIUS_M = 50_000.0
#: The largest radius the truth endpoint accepts, in metres (the whole world fits in it).
MAX_TRUTH_RADIUS_M = 1_000_000.0
#: The most places one dataset may carry.
MAX_DATASET_PLACES = 1_000_000

Latitude = Annotated[float, Field(ge=-90.0, le=90.0, strict=True, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180.0, le=180.0, strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1, max_length=200)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known_category(value: str) -> str:
    """Return `value` if it is one of the world's categories.

    Raises:
        ValueError: naming the categories there are.
    """
    if value not in CATEGORIES:
        raise ValueError(f"must be one of {', '.join(CATEGORIES)}")
    return value


class PlacesSearch(_Body):
    """The body of `POST /places/search`: a circle (metres) and one category."""

    lat: Latitude
    lng: Longitude
    radius_m: float = Field(gt=0.0, le=MAX_SEARCH_RADIUS_M, strict=True, allow_inf_nan=False)
    category: str

    _category = field_validator("category")(known_category)


class TruthQuery(_Body):
    """The query of `GET /sandbox/places/truth`: a circle (metres), and a category or all."""

    lat: float = Field(ge=-90.0, le=90.0, allow_inf_nan=False)
    lng: float = Field(ge=-180.0, le=180.0, allow_inf_nan=False)
    radius_m: float = Field(gt=0.0, le=MAX_TRUTH_RADIUS_M, allow_inf_nan=False)
    category: str | None = None

    @field_validator("category")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return None if value is None else known_category(value)


class DatasetPlace(_Body):
    """One place of a dataset, as a search answered it."""

    id: Text
    name: Text
    lat: Latitude
    lng: Longitude
    category: Text


class DatasetRequest(_Body):
    """The body of `POST /datasets`: a crawl's places."""

    crawl_id: Text
    places: list[DatasetPlace] = Field(max_length=MAX_DATASET_PLACES)


def search(world: World, request: PlacesSearch) -> Reply:
    """Answer `POST /places/search`: the nearest places, at most `MAX_RESULTS`; billed."""
    found = world.nearest(request.lat, request.lng, request.radius_m, request.category, MAX_RESULTS)
    body: dict[str, object] = {"places": [place.to_json() for place in found]}
    effect = NewEffect(kind=EffectKind.PLACES_QUERY, body=request.model_dump(mode="json"))
    return Reply(status=200, body=body, effect=effect)


def publish(request: DatasetRequest) -> Reply:
    """Answer `POST /datasets`: 201 and a dataset effect carrying the places."""
    body: dict[str, object] = {
        "id": f"ds_{uuid.uuid4().hex}",
        "crawl_id": request.crawl_id,
        "places": len(request.places),
        "status": "published",
    }
    effect = NewEffect(
        kind=EffectKind.DATASET,
        crawl_id=request.crawl_id,
        body=request.model_dump(mode="json"),
    )
    return Reply(status=201, body=body, effect=effect)


class RateCap:
    """At most `per_second` admissions in any sliding second; `None` admits everything."""

    def __init__(self, per_second: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        """Set the cap.

        Raises:
            ValueError: If `per_second` is not positive.
        """
        if per_second is not None and per_second < 1:
            raise ValueError(f"per_second must be >= 1, got {per_second}")
        self.per_second = per_second
        self._clock = clock
        self._admitted: deque[float] = deque()

    def admit(self) -> int | None:
        """Admit one request now, or refuse it.

        Returns:
            `None` if admitted; else the whole seconds to wait (at least 1), as `Retry-After`
            says them.
        """
        if self.per_second is None:
            return None
        now = self._clock()
        while self._admitted and self._admitted[0] <= now - 1.0:
            self._admitted.popleft()
        if len(self._admitted) < self.per_second:
            self._admitted.append(now)
            return None
        return max(1, math.ceil(self._admitted[0] + 1.0 - now))
