"""Decorated tasks of a user's own app (`jobs.tools.shop`) run by real workers of that app: a
group of chains through a kill in every call, an at-most-once call killed between acting and
recording, a dead-lettered call replayed from the CLI — counted at the sandbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Signature, chain, group

from jobs.tasks.running import close_runtime
from jobs.tools import shop
from ledger import DeadLetterReason, DeadLetterStore, JobState
from tests.conftest import queue_length
from tests.shop_app import shop_on
from tests.system.conftest import System, SystemFactory, per_order

pytestmark = pytest.mark.system

#: Short leases: a killed call's key comes free in two seconds.
FAST = {"ONCELERY_STEP_LEASE": "2", "ONCELERY_SWEEP_INTERVAL": "1"}


@pytest.fixture
def sender(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process sends the shop's tasks as its code would, keeping each call in the
    test's ledger once published."""
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    yield
    close_runtime()


def calls(system: System, task: str) -> dict[JobState, int]:
    counts: dict[JobState, int] = {}
    for job in system.store.list_jobs(pipeline=f"task:shop.{task}", limit=1000):
        counts[job.state] = counts.get(job.state, 0) + 1
    return counts


def order_chain(order: str, customer: str) -> Signature[Any]:
    """reserve → charge → notify for one order."""
    return chain(shop.reserve.s(order, customer, "SKU-1", 2), shop.charge.s(), shop.notify.s())


def test_chains_go_on_through_a_kill_in_every_call_and_act_once(
    postgres_url: str, amqp_url: str, sender: None, system_factory: SystemFactory
) -> None:
    # Given two workers of the shop, whose every call kills its pool child once right after
    # acting (before its record), and a provider failing 20 % of requests with a 5xx
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=0,
        sandbox_options=["--fault-rate", "0.2"],
    )  # fmt: skip
    env = {**FAST, "ONCELERY_CRASH_POINTS": "call:after_act:once"}
    for number in range(2):
        system.start_shop_worker(f"shop{number}", extra_env=env)

    # When six orders go through reserve → charge → notify, sent by the shop's own app as a
    # group of chains
    orders = [f"ord-{uuid.uuid4().hex[:6]}" for _ in range(6)]
    with shop_on(amqp_url):
        group(order_chain(order, f"cust-{order}") for order in orders).apply_async()

        # Then every call succeeds, each order charged and notified exactly once
        def done() -> bool:
            return calls(system, "notify").get(JobState.SUCCEEDED, 0) == len(orders)

        system.wait_for(done, "every chain to reach notify", timeout=150)
    for task in ("reserve", "charge", "notify"):
        assert calls(system, task) == {JobState.SUCCEEDED: len(orders)}, task
    effects = system.effects()
    assert per_order(effects, "charge") == dict.fromkeys(orders, 1)
    assert per_order(effects, "notification") == dict.fromkeys(orders, 1)
    # and the workers did die: every charge acted at least twice under its key
    charge_requests = [r for r in system.requests() if r.get("path") == "/payments/charges"]
    assert len(charge_requests) >= 2 * len(orders)
    assert system.cli_json("audit")["clean"] is True


def test_an_at_most_once_call_killed_after_acting_is_unknown_until_a_person_resolves_it(
    postgres_url: str, amqp_url: str, sender: None, system_factory: SystemFactory
) -> None:
    # Given a worker whose at-most-once calls kill it after acting, every time
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=0,
        sandbox_options=["--no-idempotency"],
    )  # fmt: skip
    env = {**FAST, "ONCELERY_CRASH_POINTS": "call:after_act:always"}
    system.start_shop_worker("shop0", extra_env=env)

    # When one call is sent
    with shop_on(amqp_url):
        shop.note.delay("ord-note", "cust-note")

        # Then it is dead-lettered as unknown, and never acted again
        def dead() -> bool:
            return calls(system, "note") == {JobState.DEAD_LETTERED: 1}

        system.wait_for(dead, "the call to be dead-lettered", timeout=60)
        [letter] = DeadLetterStore(engine=system.store.engine).list()
        assert letter.reason is DeadLetterReason.OUTCOME_UNKNOWN
        assert (letter.pipeline, letter.key) == ("task:shop.note", "note:ord-note")
        assert len(_notes(system)) == 1
        assert system.history(str(letter.job_id))["state"] == "dead_lettered"
        # the audit accepts the effect of an unknown key; a replay needs --force
        assert system.cli_json("audit")["clean"] is True
        refused = system.cli_json("dlq", "replay", str(letter.id), expect=1)
        assert "unknown" in refused["results"][0]["detail"]

        # When a person says it did take effect
        system.cli_json("dlq", "resolve", str(letter.id), "--as", "succeeded")

        # Then the call is recorded, and its re-sent message answers without acting
        system.wait_for(
            lambda: (
                calls(system, "note") == {JobState.SUCCEEDED: 1}
                and queue_length(amqp_url, shop.QUEUE) == 0
            ),
            "the resolved call's message to be answered",
        )
    assert len(_notes(system)) == 1
    assert system.cli_json("audit")["clean"] is True


def _notes(system: System) -> list[dict[str, object]]:
    return [r for r in system.requests() if r.get("path") == "/notifications"]


def test_a_dead_lettered_call_replayed_from_the_cli_resumes_its_chain(
    postgres_url: str, redis_url: str, sender: None, system_factory: SystemFactory
) -> None:
    # Given a shop worker, and a payments service that fails every request
    system = system_factory(
        database_url=postgres_url, broker_url=redis_url, workers=0,
        extra_env={**FAST, "ONCELERY_RETRY_MAX_ATTEMPTS": "2"},
    )  # fmt: skip
    system.start_shop_worker("shop0")
    system.faults(fault_rate=1.0, service="payments")

    # When a chain is sent: its charge gives up and is dead-lettered, notify never runs
    with shop_on(redis_url):
        order_chain("ord-replay", "cust-replay").apply_async()
        system.wait_for(
            lambda: calls(system, "charge") == {JobState.DEAD_LETTERED: 1}, "a dead letter"
        )
        assert calls(system, "notify") == {}
        [letter] = system.cli_json("dlq", "list")["dead_letters"]
        assert (letter["pipeline"], letter["key"]) == ("task:shop.charge", "charge:ord-replay")

        # and, the payments back, a person replays it
        system.faults(fault_rate=0.0, service="payments")
        [replayed] = system.cli_json("dlq", "replay", str(letter["id"]))["results"]
        assert replayed["done"] is True, replayed

        # Then the charge runs from its kept message, and the chain after it goes on
        system.wait_for(
            lambda: calls(system, "notify") == {JobState.SUCCEEDED: 1}, "the chain to resume"
        )
    effects = system.effects()
    assert per_order(effects, "charge") == {"ord-replay": 1}
    assert per_order(effects, "notification") == {"ord-replay": 1}
    [call] = system.history(letter["job_id"])["steps"]
    kinds = [event["kind"] for event in call["events"]]
    assert (call["state"], kinds.count("failed"), kinds[-1]) == ("succeeded", 1, "succeeded")
