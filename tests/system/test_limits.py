"""Limits every worker obeys, with real workers, beat and the sandbox, counted at the sandbox:
a crawl against a provider capped at N searches a second, under a rate limit of N, gets no
429 and never more than N x 1.05 in a second; one customer's orders, one charge at a time,
never have two charges in flight at once — with a worker killed holding the customer's slot
(which comes back within one lease) and another SIGKILLed mid-run."""

from __future__ import annotations

import itertools
import json
import signal
import uuid
from datetime import datetime

from jobs.tools.crawl_demo import AREAS
from ledger import JobState
from tests.factories import order_event
from tests.system.conftest import System, SystemFactory, per_order
from tests.system.test_places_crawl import RECOVERY_SETTINGS, assert_crawled_once, enqueue_crawl

#: Searches a second the sandbox admits, and the crawl's rate limit.
RATE = 25
#: Orders of the one customer whose charges go one at a time.
ORDERS = 6
LIMITS = {
    "places-crawl.search": {"rate": {"key": "provider:places", "per_second": RATE}},
    "order-placed.act": {"concurrency": {"key": "customer:{customer_id}", "limit": 1}},
}


def _seconds(moment: object) -> float:
    return datetime.fromisoformat(str(moment)).timestamp()


def busiest_second(times: list[float]) -> int:
    """The most of `times` in any one-second window."""
    times, most, first = sorted(times), 0, 0
    for last, moment in enumerate(times):
        while moment - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def overlapping(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intervals that began before the one before them ended."""
    ordered = sorted(intervals)
    return [later for earlier, later in itertools.pairwise(ordered) if later[0] < earlier[1]]


def test_limits_hold_across_workers_with_workers_killed(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given a provider admitting RATE searches a second and taking 100 ms a charge, the
    # crawl limited to RATE a second and each customer to one charge at a time
    run = uuid.uuid4().hex[:6]
    system = system_factory(
        database_url=postgres_url,
        broker_url=amqp_url,
        workers=0,
        sandbox_options=["--places-rate", str(RATE)],
        extra_env={**RECOVERY_SETTINGS, "ONCELERY_LIMITS": json.dumps(LIMITS)},
    )
    system.faults(service="payments", latency_ms=100)
    # and, queued before any worker starts, a crawl and the customer's orders (and others')
    crawl = enqueue_crawl(system, f"limits-{run}", AREAS[0])
    solo = [
        order_event(event_id=f"{run}-solo-{n}", customer_id=f"solo-{run}") for n in range(ORDERS)
    ]
    others = [order_event(event_id=f"{run}-other-{n}") for n in range(4)]
    orders = system.enqueue([*solo, *others])
    # When workers start, one of the customer's orders killing its worker right after its
    # claim took the slot (as a SIGKILL would, mid-charge), beat with them
    armed = {"ONCELERY_CRASH_POINTS": f"act:after_claim:once:{orders[0]}"}
    first = system.start_worker("worker0", extra_env=armed)
    system.start_worker("worker1", extra_env=armed)
    system.start_beat()
    # and a worker is SIGKILLed mid-crawl, another started in its place
    system.wait_for(lambda: _billed(system) >= 30, "30 searches billed", timeout=60)
    first.signal(signal.SIGKILL)
    first.stop()
    system.started.remove(first)
    system.start_worker("worker2")

    counts = system.wait_finished(run, ORDERS + 4, timeout=120)
    system.wait_finished(f"limits-{run}", 1, timeout=120)

    # Then every order is charged once, the crawl paid once per circle
    assert counts[JobState.SUCCEEDED] == ORDERS + 4, counts
    charges = per_order(system.effects(), "charge")
    assert sorted(charges.values()) == [1] * (ORDERS + 4)
    assert_crawled_once(system, crawl, f"limits-{run}", AREAS[0])
    requests = system.requests()
    # and (a) the provider never refused a search, never saw more than RATE x 1.05 in a second
    searches = [r for r in requests if r["service"] == "places"]
    assert [r for r in searches if r["status"] == 429] == []
    assert busiest_second([_seconds(r["started_at"]) for r in searches]) <= RATE * 1.05
    # and (b) never had two of the customer's charges in flight at once
    keys = {f"order:{event['order_id']}:charge" for event in solo}
    in_flight = [
        (_seconds(r["started_at"]), _seconds(r["at"]))
        for r in requests
        if r["service"] == "payments" and r["idempotency_key"] in keys
    ]
    assert len(in_flight) >= ORDERS
    assert overlapping(in_flight) == []
    # and the killed holder's slot came back: its order was charged, others waited for it
    assert (system.data_dir / "crash-markers").exists()
    waited = [
        event
        for job in orders[:ORDERS]
        for step in system.history(job)["steps"]
        for event in step["events"]
        if event["kind"] == "limited"
    ]
    assert waited, "no order waited for its customer's slot"
    assert {event["detail"]["limit"] for event in waited} == {f"customer:solo-{run}"}


def _billed(system: System) -> int:
    return sum(1 for effect in system.effects() if effect["kind"] == "places_query")
