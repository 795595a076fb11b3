"""The places-crawl pipeline shipped with oncelery: plan → search (a map over circles ×
categories, splitting full circles) → publish (one dataset), for each places-crawl event."""

from __future__ import annotations

from config import Settings
from jobs.maps import MapStep
from jobs.pipelines import Delivery, Pipeline, Step
from jobs.places.event import PLACES_CRAWL, Crawl
from jobs.places.geometry import Circle, cover, distance_m, plan, split
from jobs.places.steps import item_id, plan_circles, publish, search, search_items
from jobs.provider import ProviderClient

__all__ = [
    "PLACES_CRAWL",
    "Circle",
    "Crawl",
    "cover",
    "distance_m",
    "places_crawl",
    "plan",
    "split",
]


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient(base_url=settings.provider_url, timeout=settings.provider_timeout)


#: The seed's crawl: every place of some categories in an area, each circle paid for once.
places_crawl: Pipeline[ProviderClient] = Pipeline(
    name=PLACES_CRAWL,
    steps=[
        # Planning computes circles and touches nothing outside: read-only.
        Step("plan", plan_circles, key="crawl:{crawl_id}:plan", delivery=Delivery.READ_ONLY),
        MapStep(
            "search",
            search_items,
            key="crawl:{crawl_id}:search",
            each=search,
            item_id=item_id,
            effect="places_query",
        ),
        Step("publish", publish, key="crawl:{crawl_id}:dataset", effect="dataset"),
    ],
    resources=_provider,
    input=Crawl,
)
