"""Opt-in (TEST_LIMIT_FAIRNESS=1): one customer's backlog against another's one order, with
real workers and beat. Customer A's orders (TEST_LIMIT_FAIRNESS_BACKLOG, 2,000 by default)
are enqueued with their first step limited to one at a time per customer, then customer B's
one order: it must end within a few seconds, not behind A's backlog. Prints the figure."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from ledger import JobState
from tests.factories import order_event
from tests.system.conftest import SystemFactory

pytestmark = pytest.mark.skipif(
    os.environ.get("TEST_LIMIT_FAIRNESS") != "1", reason="opt-in: TEST_LIMIT_FAIRNESS=1"
)
BACKLOG = int(os.environ.get("TEST_LIMIT_FAIRNESS_BACKLOG", "2000"))
LIMITS = {"order-placed.gather": {"concurrency": {"key": "customer:{customer_id}", "limit": 1}}}


def test_one_customers_backlog_does_not_hold_up_anothers_order(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    run = uuid.uuid4().hex[:6]
    system = system_factory(
        database_url=postgres_url,
        broker_url=amqp_url,
        workers=0,
        extra_env={"ONCELERY_LIMITS": json.dumps(LIMITS)},
    )
    system.start_worker("worker0")
    system.start_worker("worker1")
    system.start_beat()
    backlog = [order_event(event_id=f"{run}-a-{n}", customer_id=f"a-{run}") for n in range(BACKLOG)]
    began = time.monotonic()
    for start in range(0, BACKLOG, 10_000):  # within the CLI's time allowance
        system.enqueue(backlog[start : start + 10_000])
    enqueued_in = time.monotonic() - began
    lone_began = time.monotonic()
    [lone] = system.enqueue([order_event(event_id=f"{run}-b-0", customer_id=f"b-{run}")])
    system.wait_finished(f"{run}-b-", 1, timeout=600)
    took = time.monotonic() - lone_began
    job = system.store.get_job(uuid.UUID(lone))
    assert job.finished_at is not None
    # Created to finished, on the ledger's clock (`took` includes the CLI's start).
    ran = (job.finished_at - job.created_at).total_seconds()
    done_a = system.store.count_by_state(event_prefix=f"{run}-a-")[JobState.SUCCEEDED]
    print(
        f"\nbacklog {BACKLOG} enqueued in {enqueued_in:.2f} s; the lone order took {ran:.2f} s "
        f"from its creation to its end ({took:.2f} s with the CLI's start), {job.state}; "
        f"{done_a} of A's done meanwhile"
    )
    if os.environ.get("TEST_LIMIT_FAIRNESS_VERBOSE"):
        for step in system.history(lone)["steps"]:
            print(step["name"], [(e["kind"], e["at"]) for e in step["events"]])
    assert job.state is JobState.SUCCEEDED
    assert ran < 2.0
