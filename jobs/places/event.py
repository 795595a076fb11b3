"""The places-crawl event: a crawl's area (a circle, metres) and the categories to collect
in it, validated strictly, with errors that name the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

#: The places-crawl pipeline's name.
PLACES_CRAWL = "places-crawl"
#: The largest area a crawl covers, in metres of radius (the provider's largest search).
MAX_AREA_RADIUS_M = 50_000.0
#: The most categories one crawl collects.
MAX_CATEGORIES = 10

#: A crawl id is part of every key of the crawl: no "/" (it ends a map step's key before
#: the item id) and no ":" (it separates a key's parts), so a key names its crawl plainly.
CrawlId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,100}$")]
Category = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,49}$")]


class Crawl(BaseModel):
    """The places-crawl pipeline's input: a places-crawl event without its `event_id`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    crawl_id: CrawlId
    lat: float = Field(ge=-90.0, le=90.0, allow_inf_nan=False)
    lng: float = Field(ge=-180.0, le=180.0, allow_inf_nan=False)
    radius_m: float = Field(gt=0.0, le=MAX_AREA_RADIUS_M, allow_inf_nan=False)
    categories: list[Category] = Field(min_length=1, max_length=MAX_CATEGORIES)

    @field_validator("categories")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        # A category named twice would query every circle twice under one key each.
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given more than once")
        return value
