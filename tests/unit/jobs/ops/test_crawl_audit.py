"""The audit of places crawls: billed queries against unique bodies, one dataset per crawl,
the dataset against the truth."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from jobs.ops.crawl_audit import audit_crawls, summary
from jobs.ops.effects import Effect
from jobs.places import PLACES_CRAWL
from ledger import JSON, Job, JobState


def crawl_job(crawl_id: str, *, saturated: int = 0) -> Job:
    now = datetime.now(UTC)
    context: dict[str, JSON] = {
        "crawl_id": crawl_id,
        "lat": 48.0,
        "lng": 2.0,
        "radius_m": 1000.0,
        "categories": ["museum"],
    }
    return Job(
        id=uuid.uuid4(),
        pipeline=PLACES_CRAWL,
        event_id=crawl_id,
        state=JobState.SUCCEEDED,
        context=context,
        fingerprint="f",
        step_keys={
            "plan": f"crawl:{crawl_id}:plan",
            "search": f"crawl:{crawl_id}:search",
            "publish": f"crawl:{crawl_id}:dataset",
        },
        results={"publish": {"saturated": saturated}},
        current_step=None,
        created_at=now,
        updated_at=now,
        finished_at=now,
    )


def query(crawl_id: str, item: str, radius: float) -> Effect:
    body: JSON = {"lat": 48.0, "lng": 2.0, "radius_m": radius, "category": "museum"}
    return Effect("places_query", f"crawl:{crawl_id}:search/{item}", None, body=body)


def dataset(crawl_id: str, ids: list[str]) -> Effect:
    body: JSON = {"crawl_id": crawl_id, "places": [{"id": place} for place in ids]}
    return Effect("dataset", f"crawl:{crawl_id}:dataset", None, crawl_id=crawl_id, body=body)


def truth(_context: object) -> set[str]:
    return {"p1", "p2"}


def test_a_clean_crawl_has_no_drift_and_its_figures_add_up() -> None:
    job = crawl_job("a")
    effects = [query("a", "i1", 1000.0), query("a", "i2", 550.0), dataset("a", ["p1", "p2"])]
    # Another crawl's query is not this one's.
    effects.append(query("b", "i1", 1000.0))

    figures, drift = audit_crawls([job], effects, truth)

    assert drift == []
    [crawl] = figures
    assert (crawl.queries, crawl.unique_queries, crawl.datasets) == (2, 2, 1)
    assert (crawl.places, crawl.expected, crawl.missing, crawl.unexpected) == (2, 2, 0, 0)
    assert summary(figures) == {
        "crawls": 1, "queries": 2, "duplicate_queries": 0, "datasets": 1,
        "duplicate_datasets": 0, "places_found": 2, "places_expected": 2, "places_missing": 0,
        "saturated": 0,
    }  # fmt: skip


def test_two_billed_queries_with_one_body_are_an_overfetch() -> None:
    # Two items (keys) searching the same circle and category: the crawl paid twice.
    effects = [query("a", "i1", 1000.0), query("a", "i1-again", 1000.0), dataset("a", ["p1", "p2"])]

    figures, drift = audit_crawls([crawl_job("a")], effects, truth)

    assert [d.problem for d in drift] == ["duplicate_query"]
    assert summary(figures)["duplicate_queries"] == 1


def test_two_datasets_and_a_missing_place_are_drift() -> None:
    effects = [query("a", "i1", 1000.0), dataset("a", ["p1"]), dataset("a", ["p1"])]

    figures, drift = audit_crawls([crawl_job("a")], effects, truth)

    assert [d.problem for d in drift] == ["duplicate_dataset", "dataset_differs_from_truth"]
    assert figures[0].missing == 1


def test_a_saturated_crawl_may_miss_places_but_never_add_any() -> None:
    missing = [query("a", "i1", 1000.0), dataset("a", ["p1"])]
    added = [query("a", "i1", 1000.0), dataset("a", ["p1", "p2", "p3"])]

    assert audit_crawls([crawl_job("a", saturated=1)], missing, truth)[1] == []
    [drift] = audit_crawls([crawl_job("a", saturated=1)], added, truth)[1]
    assert drift.problem == "dataset_differs_from_truth"


def test_without_the_truth_the_dataset_is_counted_not_compared() -> None:
    figures, drift = audit_crawls([crawl_job("a")], [dataset("a", ["p1"])], None)

    assert drift == []
    assert (figures[0].places, figures[0].expected, figures[0].missing) == (1, None, None)
    assert summary(figures)["places_expected"] is None
