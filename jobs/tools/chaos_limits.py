"""`oncelery chaos --limits N`: limits every worker obeys, under fire — crawls against a
provider admitting N searches a second under a rate limit of N, customers' orders one charge at
a time, workers SIGKILLed every few seconds — counted at the provider: no 429, no second over
N x 1.05, no two charges of a customer in flight at once; and how long one order of a new
customer waited behind the others' backlog."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final

import httpx

from config import Settings
from jobs.orders import OrderItem, OrderPlaced, enqueue_orders
from jobs.tools.chaos import CHAOS_ENVIRONMENT, ChaosOptions, Mayhem
from jobs.tools.crawl_demo import crawl_events, enqueue_crawls
from jobs.tools.harness import FINISHED, Harness, Progress
from jobs.worker import CeleryDispatch
from ledger import JobState

#: Orders per customer: each customer's charges go one at a time.
ORDERS_PER_CUSTOMER: Final = 10
#: A charge takes this long at the provider, so that two in flight at once would show.
CHARGE_MS: Final = 50


@dataclass(frozen=True)
class LimitChaosReport:
    """The run's figures, counted at the provider, and every broken invariant."""

    broker: str
    rate: int
    orders: int
    customers: int
    completed: int
    charges: int
    duplicate_charges: int
    #: Charges of one customer that began before the one before them ended.
    overlapping_charges: int
    crawls: int
    queries: int
    refused_429: int
    #: The most searches the provider received in any one second.
    busiest_second: int
    #: Seconds from the enqueue of one order of a new customer, behind everything else, to
    #: its end.
    lone_order_seconds: float | None
    kills: int
    seconds: float
    violations: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def ok(self) -> bool:
        """Every limit held, every order charged once, nothing stuck."""
        return not self.violations

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        """One line."""
        return (
            f"chaos --limits {self.rate} {self.broker}: orders={self.orders} "
            f"completed={self.completed} charges={self.charges} "
            f"duplicate_charges={self.duplicate_charges} "
            f"overlapping_charges={self.overlapping_charges} queries={self.queries} "
            f"refused_429={self.refused_429} busiest_second={self.busiest_second} "
            f"lone_order_seconds={self.lone_order_seconds} kills={self.kills} "
            f"seconds={self.seconds:.1f} -> {'OK' if self.ok else 'FAILED'}"
        )


def limits_environment(rate: int) -> dict[str, str]:
    """What the run's processes are told: chaos's short leases and sweeps, and the limits."""
    limits = {
        "places-crawl.search": {"rate": {"key": "provider:places", "per_second": rate}},
        "order-placed.act": {"concurrency": {"key": "customer:{customer_id}", "limit": 1}},
    }
    return {**CHAOS_ENVIRONMENT, "ONCELERY_LIMITS": json.dumps(limits)}


def run_limit_chaos(
    settings: Settings, options: ChaosOptions, rate: int, crawls: int, progress: Progress
) -> LimitChaosReport:
    """Run `crawls` crawls and `options.orders` orders (ten a customer) under the limits while
    workers are SIGKILLed, then one order of a new customer; wait for them and count at the
    provider. Every process it starts is stopped before it returns."""
    harness = Harness.prepare(settings, "limits", limits_environment(rate))
    mayhem = Mayhem(harness, options, random.Random(options.seed))
    timeout = options.timeout or 300.0 + options.orders * 0.5
    try:
        harness.start_sandbox(["--places-rate", str(rate), "--hang-seconds", "2"])
        httpx.post(
            f"{settings.provider_url}/sandbox/faults",
            json={"service": "payments", "latency_ms": CHARGE_MS},
            timeout=10,
        ).raise_for_status()
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        harness.start_beat()
        began = time.monotonic()
        mayhem.next_kill = began + options.kill_every
        enqueue_crawls(harness, crawl_events(crawls, f"{harness.prefix}crawl-"))
        orders = _orders(harness.prefix, options.orders, options.seed)
        enqueue_orders(harness.store, CeleryDispatch(), orders)
        lone = _orders(f"{harness.prefix}lone-", 1, options.seed, customers=1)
        lone_began = time.monotonic()
        enqueue_orders(harness.store, CeleryDispatch(), lone)
        total = options.orders + crawls + 1
        shares = {"finished": 0.0}
        lone_seconds: list[float] = []

        def watch(done: int, expected: int) -> None:
            shares["finished"] = done / max(expected, 1)
            progress(done, expected)
            if not lone_seconds and _ended(harness, lone[0].event_id):
                lone_seconds.append(time.monotonic() - lone_began)

        harness.wait(total, timeout, watch, lambda: mayhem.tick(shares["finished"]))
        seconds = time.monotonic() - began
        time.sleep(2.0)  # let a killed worker's orphans finish what they were doing
        found = (orders, crawls, lone_seconds[0] if lone_seconds else None)
        return _report(harness, rate, found, mayhem, seconds)
    finally:
        harness.stop()


def _orders(prefix: str, count: int, seed: int | None, customers: int = 0) -> list[OrderPlaced]:
    rng = random.Random(seed)
    customers = customers or max(1, count // ORDERS_PER_CUSTOMER)
    return [
        OrderPlaced(
            event_id=f"{prefix}{number}",
            order_id=f"{prefix}{number}",
            customer_id=f"{prefix}customer-{number % customers}",
            currency="EUR",
            items=[OrderItem(sku=f"SKU-{rng.randrange(1, 40)}", quantity=rng.randrange(1, 4))],
        )
        for number in range(count)
    ]


def _ended(harness: Harness, event_id: str) -> bool:
    return any(job.state in FINISHED for job in harness.store.jobs_with_event_prefix(event_id))


def _report(
    harness: Harness,
    rate: int,
    found: tuple[list[OrderPlaced], int, float | None],
    mayhem: Mayhem,
    seconds: float,
) -> LimitChaosReport:
    orders, crawls, lone_seconds = found
    provider = harness.settings.provider_url
    requests: list[dict[str, Any]] = httpx.get(f"{provider}/sandbox/requests", timeout=60).json()
    effects: list[dict[str, Any]] = httpx.get(f"{provider}/sandbox/effects", timeout=60).json()
    customer_of = {f"order:{order.order_id}:charge": order.customer_id for order in orders}
    charges = Counter(
        str(e["order_id"])
        for e in effects
        if e["kind"] == "charge" and str(e["order_id"]).startswith(harness.prefix)
    )
    searches = [r for r in requests if r["service"] == "places"]
    in_flight: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in requests:
        customer = customer_of.get(str(r["idempotency_key"]))
        if r["service"] == "payments" and customer is not None and r["started_at"]:
            in_flight[customer].append((_seconds(r["started_at"]), _seconds(r["at"])))
    overlapping = sum(_overlaps(intervals) for intervals in in_flight.values())
    counts = harness.counts() or dict.fromkeys(JobState, 0)
    busiest = _busiest_second([_seconds(r["started_at"]) for r in searches if r["started_at"]])
    refused = sum(1 for r in searches if r["status"] == 429)
    violations = _violations(counts, orders, crawls, charges, refused, busiest, overlapping, rate)
    return LimitChaosReport(
        broker=harness.settings.broker_kind,
        rate=rate,
        orders=len(orders),
        customers=len({order.customer_id for order in orders}),
        completed=counts[JobState.SUCCEEDED],
        charges=sum(charges.values()),
        duplicate_charges=sum(n - 1 for n in charges.values() if n > 1),
        overlapping_charges=overlapping,
        crawls=crawls,
        queries=sum(1 for e in effects if e["kind"] == "places_query"),
        refused_429=refused,
        busiest_second=busiest,
        lone_order_seconds=round(lone_seconds, 2) if lone_seconds is not None else None,
        kills=mayhem.kills,
        seconds=round(seconds, 1),
        violations=violations,
        logs=str(harness.log_dir),
    )


def _violations(
    counts: dict[JobState, int],
    orders: list[OrderPlaced],
    crawls: int,
    charges: Counter[str],
    refused: int,
    busiest: int,
    overlapping: int,
    rate: int,
) -> list[str]:
    found = []
    expected = len(orders) + crawls + 1
    if counts[JobState.SUCCEEDED] != expected:
        found.append(f"{counts[JobState.SUCCEEDED]} of {expected} jobs succeeded: {counts}")
    found += [f"order {order}: {n} charges" for order, n in charges.items() if n > 1]
    if refused:
        found.append(f"the provider refused {refused} searches (429)")
    if busiest > rate * 1.05:
        found.append(f"{busiest} searches in one second, above {rate} x 1.05")
    if overlapping:
        found.append(f"{overlapping} charges began while another of their customer's was on")
    return found


def _seconds(moment: object) -> float:
    return datetime.fromisoformat(str(moment)).timestamp()


def _busiest_second(times: list[float]) -> int:
    """The most of `times` in any one-second window."""
    ordered, most, first = sorted(times), 0, 0
    for last, moment in enumerate(ordered):
        while moment - ordered[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def _overlaps(intervals: list[tuple[float, float]]) -> int:
    """How many intervals began before the latest end of those that began before them."""
    count, latest_end = 0, float("-inf")
    for start, end in sorted(intervals):
        if start < latest_end:
            count += 1
        latest_end = max(latest_end, end)
    return count
