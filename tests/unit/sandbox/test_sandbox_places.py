"""The places search and datasets over HTTP (in process): answers, billing, keys, bad bodies,
the truth, faults and the rate cap."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from jobs.sandbox.places import RateCap
from jobs.sandbox.world import ORIGIN
from tests.sandbox_client import SandboxClient
from tests.waiting import wait_for

SEARCH = {"lat": ORIGIN[0], "lng": ORIGIN[1], "radius_m": 400.0, "category": "museum"}
DATASET = {
    "crawl_id": "crawl-1",
    "places": [
        {"id": "pl_1", "name": "Old Oak Museum", "lat": 1.0, "lng": 2.0, "category": "museum"}
    ],
}


def _search(
    sandbox: SandboxClient, key: str | None = "q-1", /, **changes: object
) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return sandbox.post("/places/search", json={**SEARCH, **changes}, headers=headers)


def _truth(sandbox: SandboxClient, **params: str | int) -> httpx.Response:
    query = {"lat": str(SEARCH["lat"]), "lng": str(SEARCH["lng"]), "radius_m": "400"}
    return sandbox.get("/sandbox/places/truth", params={**query, **params})


def test_a_search_answers_the_20_nearest_of_the_truth_and_is_billed_with_its_body(
    sandbox: SandboxClient,
) -> None:
    answer = _search(sandbox, radius_m=2_000.0)

    assert answer.status_code == 200
    places = answer.json()["places"]
    truth = _truth(sandbox, radius_m=2_000, category="museum").json()["places"]
    assert len(truth) > 20
    assert places == truth[:20]
    assert set(places[0]) == {"id", "name", "lat", "lng", "category"}
    [effect] = sandbox.effects(kind="places_query")
    assert effect["idempotency_key"] == "q-1"
    assert effect["body"] == {**SEARCH, "radius_m": 2_000.0}
    assert effect["service"] == "places"


def test_a_small_circle_answers_fewer_and_the_truth_spans_categories(
    sandbox: SandboxClient,
) -> None:
    answer = _search(sandbox, radius_m=150.0)
    everything = _truth(sandbox, radius_m=150).json()["places"]

    assert 0 < len(answer.json()["places"]) < 20
    assert {place["category"] for place in everything} > {"museum"}
    assert [p for p in everything if p["category"] == "museum"] == answer.json()["places"]


def test_a_repeat_is_answered_the_first_answer_unbilled_and_another_body_is_refused(
    sandbox: SandboxClient,
) -> None:
    first = _search(sandbox)
    again = sandbox.post(
        "/places/search",
        json={"category": "museum", "radius_m": 400, "lng": ORIGIN[1], "lat": ORIGIN[0]},
        headers={"Idempotency-Key": "q-1"},
    )
    reused = _search(sandbox, radius_m=500.0)

    assert (again.status_code, again.json()) == (200, first.json())
    assert reused.status_code == 422
    assert reused.json()["error"]["type"] == "idempotency_key_reused"
    assert "q-1" in reused.json()["error"]["message"]
    assert len(sandbox.effects(kind="places_query")) == 1


def test_every_search_without_a_key_is_billed(sandbox: SandboxClient) -> None:
    _search(sandbox, None)
    _search(sandbox, None)

    assert len(sandbox.effects(kind="places_query")) == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"radius_m": 0.0}, "radius_m"),
        ({"radius_m": 50_000.5}, "radius_m"),
        ({"lat": 90.5}, "lat"),
        ({"lng": "2.35"}, "lng"),
        ({"category": "zoo"}, "category"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_search_is_a_422_naming_the_field_and_is_not_billed(
    sandbox: SandboxClient, changes: dict[str, object], field: str
) -> None:
    answer = _search(sandbox, **changes)

    assert answer.status_code == 422
    assert any(field in error["loc"] for error in answer.json()["detail"])
    assert sandbox.effects() == []
    assert sandbox.requests(service="places")[0]["status"] == 422


@pytest.mark.parametrize(
    ("params", "field"),
    [({"radius_m": "0"}, "radius_m"), ({"category": "zoo"}, "category"), ({"lat": "x"}, "lat")],
)
def test_a_bad_truth_query_is_a_422_naming_the_field(
    sandbox: SandboxClient, params: dict[str, str], field: str
) -> None:
    answer = _truth(sandbox, **params)

    assert answer.status_code == 422
    assert any(field in error["loc"] for error in answer.json()["detail"])


def test_faults_for_places_apply_to_the_search_alone(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox()
    sandbox.post("/sandbox/faults", json={"service": "places", "fault_rate": 1.0})

    assert _search(sandbox).status_code == 503
    assert sandbox.post("/datasets", json=DATASET).status_code == 201
    assert sandbox.effects(kind="places_query") == []


def test_a_lost_reply_bills_once_and_the_retry_gets_the_answer(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox()
    sandbox.post("/sandbox/faults", json={"service": "places", "lost_reply_rate": 1.0})

    assert _search(sandbox).status_code == 504
    sandbox.post("/sandbox/faults", json={"service": "places"})
    retried = _search(sandbox)

    assert retried.status_code == 200
    assert len(retried.json()["places"]) == 20
    assert len(sandbox.effects(kind="places_query")) == 1


def test_above_the_rate_a_search_is_a_429_unbilled_and_its_key_stays_free(
    make_sandbox: Callable[..., SandboxClient],
) -> None:
    sandbox = make_sandbox(places_rate=2)
    answers = [_search(sandbox, f"q-{n}") for n in range(8)]

    refused = [n for n, answer in enumerate(answers) if answer.status_code == 429]
    assert refused, "8 searches in a row never hit a cap of 2 per second"
    assert answers[refused[0]].headers["Retry-After"] == "1"
    assert answers[refused[0]].json()["error"]["type"] == "rate_limited"
    assert len(sandbox.effects(kind="places_query")) == 8 - len(refused)

    def admitted() -> httpx.Response | None:
        answer = _search(sandbox, f"q-{refused[0]}")
        return answer if answer.status_code == 200 else None

    later = wait_for(admitted, "the refused key to be admitted after a second", timeout=5)
    assert later.json()["places"]


def test_the_rate_cap_admits_per_sliding_second() -> None:
    now = [0.0]
    cap = RateCap(2, clock=lambda: now[0])

    assert [cap.admit(), cap.admit(), cap.admit()] == [None, None, 1]
    now[0] = 0.999
    assert cap.admit() == 1
    now[0] = 1.0
    assert [cap.admit(), cap.admit(), cap.admit()] == [None, None, 1]
    assert RateCap(None).admit() is None
    with pytest.raises(ValueError, match="per_second"):
        RateCap(0)


def test_a_dataset_is_published_once_per_key(sandbox: SandboxClient) -> None:
    headers = {"Idempotency-Key": "crawl-1:publish"}
    first = sandbox.post("/datasets", json=DATASET, headers=headers)
    again = sandbox.post("/datasets", json=DATASET, headers=headers)
    other = sandbox.post("/datasets", json={**DATASET, "places": []}, headers=headers)

    assert first.status_code == 201
    assert first.json()["places"] == 1
    assert again.json() == first.json()
    assert other.status_code == 422
    [effect] = sandbox.effects(kind="dataset", crawl_id="crawl-1")
    assert (effect["idempotency_key"], effect["body"]) == ("crawl-1:publish", DATASET)
    assert sandbox.effects(crawl_id="crawl-2") == []


def test_a_dataset_without_a_crawl_id_is_a_422(sandbox: SandboxClient) -> None:
    answer = sandbox.post("/datasets", json={"places": []})

    assert answer.status_code == 422
    assert any("crawl_id" in error["loc"] for error in answer.json()["detail"])
