"""The places API of a real `oncelery sandbox` process: the world of its `--places-seed`, the
search billed once per key, faults for `places`, datasets, and the `--places-rate` cap."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from jobs.sandbox.world import CENTRES, World
from jobs.tools import processes
from tests.waiting import wait_for

SEED = 3
#: The cap the process is started with: a test sends a few searches, the burst many more.
RATE = 10
#: The east town: a few hundred museums within 3 km, so more than a page of 20.
EAST_TOWN = CENTRES[3].position()
SEARCH = {"lat": EAST_TOWN[0], "lng": EAST_TOWN[1], "radius_m": 3_000.0, "category": "museum"}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A sandbox process of seed `SEED`, capped at `RATE` searches per second."""
    tmp = tmp_path_factory.mktemp("places")
    port = processes.free_port()
    options = ["--places-seed", str(SEED), "--places-rate", str(RATE), "--hang-seconds", "0.2"]
    argv = processes.sandbox_argv(port, db_path=tmp / "sandbox.sqlite3", options=options)
    process = processes.start("sandbox", argv, env=dict(os.environ), log_dir=tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        processes.wait_until_answers(f"{url}/healthz", process=process)
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client
    finally:
        processes.stop_all([process])


@pytest.fixture
def sandbox(started: httpx.Client) -> httpx.Client:
    """The sandbox, its requests and effects forgotten and its faults cleared."""
    started.post("/sandbox/reset").raise_for_status()
    started.post("/sandbox/faults", json={}).raise_for_status()
    started.post("/sandbox/faults", json={"service": "places"}).raise_for_status()
    return started


def _search(client: httpx.Client, key: str, **changes: object) -> httpx.Response:
    return client.post(
        "/places/search", json={**SEARCH, **changes}, headers={"Idempotency-Key": key}
    )


def _effects(client: httpx.Client, **filters: str) -> list[dict[str, object]]:
    answer = client.get("/sandbox/effects", params=filters)
    answer.raise_for_status()
    rows: list[dict[str, object]] = answer.json()
    return rows


def test_the_process_answers_from_the_world_of_its_seed_and_bills_each_key_once(
    sandbox: httpx.Client,
) -> None:
    params = {key: str(value) for key, value in SEARCH.items()}
    truth = sandbox.get("/sandbox/places/truth", params=params).json()["places"]

    first = _search(sandbox, "q-1")
    again = _search(sandbox, "q-1")
    reused = _search(sandbox, "q-1", radius_m=2_000.0)

    # Another process made the same world from the same seed (the default seed's is another).
    expected = World(SEED).within(EAST_TOWN[0], EAST_TOWN[1], 3_000.0, "museum")
    assert truth == [place.to_json() for place in expected]
    assert len(truth) > 20
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"places": truth[:20]}
    assert reused.status_code == 422
    [effect] = _effects(sandbox, kind="places_query")
    assert (effect["idempotency_key"], effect["body"]) == ("q-1", SEARCH)


def test_faults_for_places_and_a_dataset(sandbox: httpx.Client) -> None:
    sandbox.post("/sandbox/faults", json={"service": "places", "fault_rate": 1.0})
    failed = _search(sandbox, "q-1")
    sandbox.post("/sandbox/faults", json={"service": "places", "lost_reply_rate": 1.0})
    lost = _search(sandbox, "q-1")
    sandbox.post("/sandbox/faults", json={"service": "places"})
    retried = _search(sandbox, "q-1")
    dataset = {"crawl_id": "crawl-1", "places": retried.json()["places"]}
    published = sandbox.post("/datasets", json=dataset, headers={"Idempotency-Key": "d-1"})

    assert (failed.status_code, lost.status_code, retried.status_code) == (503, 504, 200)
    assert len(_effects(sandbox, kind="places_query")) == 1
    assert published.status_code == 201
    [effect] = _effects(sandbox, kind="dataset", crawl_id="crawl-1")
    assert effect["body"] == dataset


def test_above_the_rate_cap_a_search_is_a_429_with_retry_after_and_unbilled(
    sandbox: httpx.Client,
) -> None:
    # The world is made before the burst, so the burst's searches follow one another quickly.
    sandbox.get("/sandbox/places/truth", params={"lat": 0, "lng": 0, "radius_m": 1})

    answers = [_search(sandbox, f"q-{n}") for n in range(3 * RATE)]

    refused = [n for n, answer in enumerate(answers) if answer.status_code == 429]
    assert refused, [answer.status_code for answer in answers]
    assert answers[refused[0]].headers["Retry-After"] == "1"
    billed = len(answers) - len(refused)
    assert len(_effects(sandbox, kind="places_query")) == billed
    # The refused key was not kept: once the second has passed, it is answered and billed.
    wait_for(
        lambda: _search(sandbox, f"q-{refused[0]}").status_code == 200,
        "a refused search to be admitted later",
        timeout=5,
    )
    assert len(_effects(sandbox, kind="places_query")) == billed + 1
