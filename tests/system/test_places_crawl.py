"""The places crawl with real workers, counted at the sandbox: a crawl whose area needs four
levels of splitting finds every place of the truth, pays once per (circle, category) and
publishes one dataset — on RabbitMQ and Redis (with provider faults), on the embedded default
(through `oncelery demo --pipeline places-crawl --json`), and with workers SIGKILLed mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import child_environment
from jobs.tools import processes
from jobs.tools.crawl_demo import AREAS, Area
from tests.conftest import REPO_ROOT
from tests.system.conftest import System, SystemFactory

pytestmark = pytest.mark.system

#: The south village: 105 searches, four levels of splitting, 271 places (seed 1).
SMALL = AREAS[0]
#: The east town: 319 searches, long enough to be killed in the middle of.
LARGER = AREAS[1]

RECOVERY_SETTINGS = {
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "5",
    "ONCELERY_RELAY_AFTER": "1",
}


def enqueue_crawl(system: System, crawl_id: str, area: Area) -> str:
    event = {
        "event_id": crawl_id,
        "crawl_id": crawl_id,
        "lat": area.lat,
        "lng": area.lng,
        "radius_m": area.radius_m,
        "categories": list(area.categories),
    }
    done = system.cli("enqueue", "--pipeline", "places-crawl", "-", stdin=json.dumps(event))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def truth(provider_url: str, area: Area) -> set[str]:
    ids: set[str] = set()
    for category in area.categories:
        query = {"lat": area.lat, "lng": area.lng, "radius_m": area.radius_m}
        answer = httpx.get(
            f"{provider_url}/sandbox/places/truth",
            params={**query, "category": category},
            timeout=30,
        ).json()
        ids |= {place["id"] for place in answer["places"]}
    return ids


def assert_crawled_once(system: System, job_id: str, crawl_id: str, area: Area) -> int:
    """Every place of the truth in the one dataset, each billed query a body of its own and
    an item of the map; returns how many queries were billed."""
    effects = system.effects()
    prefix = f"crawl:{crawl_id}:search/"
    queries = [
        e
        for e in effects
        if e["kind"] == "places_query" and str(e["idempotency_key"]).startswith(prefix)
    ]
    bodies = Counter(json.dumps(e["body"], sort_keys=True) for e in queries)
    assert bodies.most_common(1)[0][1] == 1, "a (circle, category) was billed twice"
    datasets = [e for e in effects if e["kind"] == "dataset" and e["crawl_id"] == crawl_id]
    assert len(datasets) == 1
    body: Any = datasets[0]["body"]
    found = [place["id"] for place in body["places"]]
    assert len(found) == len(set(found))
    assert set(found) == truth(system.provider_url, area)

    view = system.history(job_id)
    assert view["state"] == "succeeded"
    items = view["steps"][1]["items"]
    assert items["total"] == items["done"] == len(queries)
    published = view["results"]["publish"]
    assert published["places"] == len(found)
    assert published["levels"] >= 3
    assert published["saturated"] == 0
    return len(queries)


def assert_audit_clean(system: System) -> dict[str, Any]:
    audit = system.cli_json("audit")
    assert audit["clean"], audit["drift"]
    crawls: dict[str, Any] = audit["crawls"]
    assert crawls["duplicate_queries"] == crawls["duplicate_datasets"] == 0
    assert crawls["places_found"] == crawls["places_expected"]
    return crawls


@pytest.mark.parametrize("broker", ["amqp", "redis"])
def test_a_crawl_finds_every_place_and_pays_once_per_circle(
    broker: str, request: pytest.FixtureRequest, postgres_url: str, system_factory: SystemFactory
) -> None:
    # Given workers on a real broker and a provider answering 10 % of calls 5xx and losing
    # 3 % of replies after billing them
    broker_url = str(request.getfixturevalue(f"{broker}_url"))
    system = system_factory(
        database_url=postgres_url,
        broker_url=broker_url,
        sandbox_options=["--fault-rate", "0.1", "--lost-reply-rate", "0.03"],
    )

    # When a crawl of an area that needs four levels of splitting runs
    job_id = enqueue_crawl(system, "village", SMALL)
    system.wait_finished("village", 1, timeout=120)

    # Then every place is found, each (circle, category) billed once, one dataset published
    queries = assert_crawled_once(system, job_id, "village", SMALL)
    assert queries == 105
    # And the searches that failed were sent again under their keys, never billed twice
    searches = [r for r in system.requests() if r["service"] == "places"]
    assert len(searches) > queries
    assert assert_audit_clean(system)["queries"] == queries


def test_the_demo_crawls_on_the_embedded_default(tmp_path: Path) -> None:
    # Given no servers at all: SQLite and the file broker, the demo's own sandbox and workers
    env = child_environment(
        {
            "ONCELERY_DATA_DIR": str(tmp_path / "data"),
            "PROVIDER_URL": f"http://127.0.0.1:{processes.free_port()}",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    for name in ("DATABASE_URL", "BROKER_URL"):
        env.pop(name, None)

    # When the demo runs one crawl
    argv = ["demo", "--pipeline", "places-crawl", "--crawls", "1", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "jobs", *argv],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    # Then it reports the contract's figures: every place found, nothing paid twice
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    contract = {
        "crawls": 1, "completed": 1, "dead_lettered": 0, "queries": 105, "duplicate_queries": 0,
        "places_found": 271, "places_expected": 271, "datasets": 1, "duplicate_datasets": 0,
    }  # fmt: skip
    assert {name: report[name] for name in contract} == contract
    assert isinstance(report["seconds"], float)
    assert report["levels"] == 4
    assert (report["broker"], report["audit_clean"]) == ("filesystem", True)


#: The items searching circles centred on the east town's centre (the plan's circle, then the
#: middle child of each split): a worker dies once at each, for museums after the provider
#: billed the search and before its record, for hotels after the record (children included)
#: and before the children are published.
CENTRE_ITEMS = {"museum": "/museum@48.8206000,", "hotel": "/hotel@48.8206000,"}
CRASHES = {
    "ONCELERY_CRASH_POINTS": f"search:after_act:once:{CENTRE_ITEMS['museum'][:-1]},"
    f"search:after_record:once:{CENTRE_ITEMS['hotel'][:-1]}"
}


def test_a_crawl_with_workers_killed_mid_run_pays_once_and_loses_nothing(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given two workers that die at the crash points above, a sweeper, short leases, and a
    # provider that answers 10 % 5xx
    system = system_factory(
        database_url=postgres_url,
        broker_url=amqp_url,
        sandbox_options=["--fault-rate", "0.1", "--latency-ms", "20"],
        extra_env={**RECOVERY_SETTINGS, **CRASHES},
    )
    system.start_beat()
    workers = [p for p in system.started if p.name.startswith("worker")]
    job_id = enqueue_crawl(system, "town", LARGER)

    # When a worker is SIGKILLed (its pool with it) each time another fifth of the items is
    # done, and a new one started in its place
    kills = 0
    for fifth in range(1, 5):
        wanted = fifth * 319 // 5
        system.wait_for(
            lambda: _items_done(system, job_id) >= wanted,  # noqa: B023 - used at once
            f"{wanted} of the items to be done",
            timeout=90,
        )
        victim = workers.pop(0)
        victim.signal(signal.SIGKILL)
        victim.stop()  # reaps it and closes its log
        system.started.remove(victim)
        workers.append(system.start_worker(f"worker-after-kill-{fifth}"))
        kills += 1
    system.wait_finished("town", 1, timeout=120)

    # Then no (circle, category) was billed twice, no place was lost, one dataset
    assert kills == 4
    assert assert_crawled_once(system, job_id, "town", LARGER) == 319
    assert_audit_clean(system)
    # And the crash points did kill: a museum search billed, then sent again under its key
    # after its worker died, answered without a second bill
    markers = list((system.data_dir / "crash-markers").iterdir())
    assert len(markers) >= 2
    prefix = f"crawl:town:search{CENTRE_ITEMS['museum']}"
    sent = Counter(
        r["idempotency_key"]
        for r in system.requests()
        if str(r["idempotency_key"]).startswith(prefix) and r["status"] == 200
    )
    assert max(sent.values()) >= 2, sent


def _items_done(system: System, job_id: str) -> int:
    history = system.store.history(uuid.UUID(job_id))
    return sum(counters.done for counters in history.maps)
