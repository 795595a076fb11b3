"""The places crawls' part of the audit: per crawl, its billed queries against its unique
query bodies (an overfetch is drift), its datasets (one), and its dataset against the
provider's truth for the crawl's area and categories."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import httpx

from jobs.errors import ProviderUnavailable
from jobs.ops.effects import Drift, Effect
from jobs.places import PLACES_CRAWL
from ledger import JSON, Job, JobState

#: Every place of the truth in a crawl's area and categories, by id (from its job context).
Truth = Callable[[Mapping[str, JSON]], set[str]]


@dataclass(frozen=True)
class CrawlFigures:
    """One crawl, counted at the provider."""

    crawl_id: str
    job_id: str
    state: str
    #: Billed searches (`places_query` effects on the crawl's item keys).
    queries: int
    #: Distinct search bodies among them: more queries than bodies is an overfetch.
    unique_queries: int
    datasets: int
    #: Places in its dataset (the first, if more than one), and in the truth.
    places: int | None
    expected: int | None
    #: Places of the truth the dataset lacks, and places in it the truth lacks.
    missing: int | None
    unexpected: int | None
    #: Circles the crawl recorded as saturated (they may hide places: missing is then expected).
    saturated: int

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return dict(asdict(self))


def crawl_jobs(jobs: Sequence[Job]) -> list[Job]:
    """The places-crawl jobs among some jobs."""
    return [job for job in jobs if job.pipeline == PLACES_CRAWL]


def audit_crawls(
    jobs: Sequence[Job], effects: Sequence[Effect], truth: Truth | None
) -> tuple[list[CrawlFigures], list[Drift]]:
    """Count each crawl's queries and datasets at the provider and compare its dataset with
    the truth (skipped when `truth` is None: a stopped sandbox's file cannot answer it).

    Args:
        jobs: the places-crawl jobs to audit.
        effects: the provider's effects (any; each crawl takes its own).
        truth: the truth's place ids for a crawl's context.
    """
    by_search_key = {job.step_keys["search"]: job for job in jobs if "search" in job.step_keys}
    queries: dict[str, list[Effect]] = defaultdict(list)
    datasets: dict[str, list[Effect]] = defaultdict(list)
    for effect in effects:
        if effect.kind == "places_query" and effect.idempotency_key:
            # An item's key is its map step's key, "/", its item id (which has no "/").
            step_key = effect.idempotency_key.rpartition("/")[0]
            if step_key in by_search_key:
                queries[str(by_search_key[step_key].id)].append(effect)
        elif effect.kind == "dataset" and effect.crawl_id is not None:
            datasets[effect.crawl_id].append(effect)
    figures: list[CrawlFigures] = []
    drift: list[Drift] = []
    for job in jobs:
        crawl_id = str(job.context.get("crawl_id"))
        counted = _crawl(job, queries[str(job.id)], datasets[crawl_id], truth)
        figures.append(counted)
        drift.extend(_drift(counted))
    return figures, drift


def _crawl(
    job: Job, queries: Sequence[Effect], datasets: Sequence[Effect], truth: Truth | None
) -> CrawlFigures:
    bodies = {json.dumps(effect.body, sort_keys=True) for effect in queries}
    published = job.results.get("publish")
    saturated = published.get("saturated") if isinstance(published, dict) else None
    wanted = truth(job.context) if truth is not None else None
    found = _place_ids(datasets[0].body) if datasets else None
    places = None if found is None else len(found)
    expected = None if wanted is None else len(wanted)
    missing = unexpected = None
    if found is not None and wanted is not None:
        missing, unexpected = len(wanted - found), len(found - wanted)
    return CrawlFigures(
        crawl_id=str(job.context.get("crawl_id")),
        job_id=str(job.id),
        state=str(job.state),
        queries=len(queries),
        unique_queries=len(bodies),
        datasets=len(datasets),
        places=places,
        expected=expected,
        missing=missing,
        unexpected=unexpected,
        saturated=saturated if isinstance(saturated, int) else 0,
    )


def _drift(crawl: CrawlFigures) -> list[Drift]:
    found: list[Drift] = []
    where = f"crawl {crawl.crawl_id}"
    if crawl.queries > crawl.unique_queries:
        detail = f"{where}: {crawl.queries} billed queries for {crawl.unique_queries} bodies"
        found.append(Drift("duplicate_query", "places_query", None, None, detail))
    if crawl.datasets > 1:
        detail = f"{where}: {crawl.datasets} datasets"
        found.append(Drift("duplicate_dataset", "dataset", None, None, detail))
    if crawl.state == JobState.SUCCEEDED and crawl.datasets == 0:
        found.append(Drift("missing_dataset", "dataset", None, None, f"{where} succeeded"))
    lacks = bool(crawl.missing) and not crawl.saturated
    if lacks or crawl.unexpected:
        detail = (
            f"{where}: {crawl.missing} places of the truth missing, "
            f"{crawl.unexpected} not in the truth"
        )
        found.append(Drift("dataset_differs_from_truth", "dataset", None, None, detail))
    return found


def _place_ids(body: JSON) -> set[str]:
    places = body.get("places") if isinstance(body, dict) else None
    if not isinstance(places, list):
        return set()
    return {str(place["id"]) for place in places if isinstance(place, dict) and "id" in place}


def truth_at(provider_url: str, *, timeout: float = 30.0) -> Truth:
    """The truth as a running sandbox provider answers it (`GET /sandbox/places/truth`, one
    call per category, each area asked once)."""
    asked: dict[str, set[str]] = {}

    def truth(context: Mapping[str, JSON]) -> set[str]:
        categories = context.get("categories")
        names = categories if isinstance(categories, list) else []
        ids: set[str] = set()
        for category in names:
            query = {
                "lat": context.get("lat"),
                "lng": context.get("lng"),
                "radius_m": context.get("radius_m"),
                "category": category,
            }
            cache_key = json.dumps(query, sort_keys=True)
            if cache_key not in asked:
                asked[cache_key] = _truth_ids(provider_url, query, timeout)
            ids |= asked[cache_key]
        return ids

    return truth


def _truth_ids(provider_url: str, query: Mapping[str, JSON], timeout: float) -> set[str]:
    try:
        params = {name: str(value) for name, value in query.items()}
        response = httpx.get(f"{provider_url}/sandbox/places/truth", params=params, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(provider_url, str(exc) or type(exc).__name__) from exc
    return _place_ids(response.json())


def summary(crawls: Sequence[CrawlFigures]) -> dict[str, JSON]:
    """The crawls' figures added up (`None` where the truth was not asked)."""
    with_truth = [crawl for crawl in crawls if crawl.expected is not None]
    return {
        "crawls": len(crawls),
        "queries": sum(crawl.queries for crawl in crawls),
        "duplicate_queries": sum(crawl.queries - crawl.unique_queries for crawl in crawls),
        "datasets": sum(crawl.datasets for crawl in crawls),
        "duplicate_datasets": sum(max(0, crawl.datasets - 1) for crawl in crawls),
        "places_found": sum(crawl.places or 0 for crawl in crawls),
        "places_expected": sum(crawl.expected or 0 for crawl in with_truth) if with_truth else None,
        "places_missing": sum(crawl.missing or 0 for crawl in with_truth) if with_truth else None,
        "saturated": sum(crawl.saturated for crawl in crawls),
    }
