"""Decorated tasks of the user's own app (tests/user_app.py) run by real workers of that app:
a chain whose calls each kill their worker once after acting, and an at-most-once call
killed between acting and recording — counted at the sandbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import chain

from ledger import DeadLetterReason, DeadLetterStore, JobState
from tests import user_app
from tests.system.conftest import System, SystemFactory, per_order

pytestmark = pytest.mark.system

#: Short leases: a killed call's key comes free in two seconds.
FAST = {"ONCELERY_STEP_LEASE": "2", "ONCELERY_SWEEP_INTERVAL": "1"}


@pytest.fixture
def proj_queue(amqp_url: str) -> Iterator[str]:
    """A queue of the user's app of its own, and the app in this process sending to it."""
    queue = f"proj-{uuid.uuid4().hex[:8]}"
    conf = user_app.app.conf
    saved = {"broker_url": conf.broker_url, "task_default_queue": conf.task_default_queue}
    conf.update(broker_url=amqp_url, task_default_queue=queue)
    yield queue
    user_app.app.close()
    conf.update(saved)


def calls(system: System, task: str) -> dict[JobState, int]:
    counts: dict[JobState, int] = {}
    for job in system.store.list_jobs(pipeline=f"task:tests.user_app.{task}", limit=1000):
        counts[job.state] = counts.get(job.state, 0) + 1
    return counts


def test_a_chain_goes_on_through_a_kill_in_every_call_and_acts_once(
    postgres_url: str, amqp_url: str, proj_queue: str, system_factory: SystemFactory
) -> None:
    # Given two workers of the user's app, whose every call kills its pool child once right
    # after acting (before its record), and a provider failing 20 % of requests with a 5xx
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=0,
        sandbox_options=["--fault-rate", "0.2"],
    )  # fmt: skip
    env = {**FAST, "PROJ_QUEUE": proj_queue, "ONCELERY_CRASH_POINTS": "call:after_act:once"}
    for number in range(2):
        system.start_user_worker(f"proj{number}", extra_env=env)

    # When eight orders go through reserve → charge → notify
    orders = [f"ord-{uuid.uuid4().hex[:6]}" for _ in range(8)]
    for order in orders:
        chain(
            user_app.reserve.s(order, f"cust-{order}", 1000),
            user_app.charge.s(),
            user_app.notify.s(),
        ).apply_async()

    # Then every call succeeds, each order charged and notified exactly once
    def done() -> bool:
        return calls(system, "notify").get(JobState.SUCCEEDED, 0) == len(orders)

    system.wait_for(done, "every chain to reach notify", timeout=150)
    for task in ("reserve", "charge", "notify"):
        assert calls(system, task) == {JobState.SUCCEEDED: len(orders)}, task
    effects = system.effects()
    assert per_order(effects, "charge") == dict.fromkeys(orders, 1)
    assert per_order(effects, "notification") == dict.fromkeys(orders, 1)
    # and the workers did die: every call acted at least twice under its key
    charge_requests = [r for r in system.requests() if r.get("path") == "/payments/charges"]
    assert len(charge_requests) >= 2 * len(orders)


def test_an_at_most_once_call_killed_after_acting_is_unknown_and_dead_lettered(
    postgres_url: str, amqp_url: str, proj_queue: str, system_factory: SystemFactory
) -> None:
    # Given a worker whose at-most-once calls kill it after acting, every time
    system = system_factory(
        database_url=postgres_url, broker_url=amqp_url, workers=0,
        sandbox_options=["--no-idempotency"],
    )  # fmt: skip
    env = {**FAST, "PROJ_QUEUE": proj_queue, "ONCELERY_CRASH_POINTS": "call:after_act:always"}
    system.start_user_worker("proj0", extra_env=env)

    # When one call is sent
    user_app.note.delay("ord-note", "cust-note")

    # Then it is dead-lettered as unknown, and never acted again
    def dead() -> bool:
        return calls(system, "note") == {JobState.DEAD_LETTERED: 1}

    system.wait_for(dead, "the call to be dead-lettered", timeout=60)
    [letter] = DeadLetterStore(engine=system.store.engine).list()
    assert letter.reason is DeadLetterReason.OUTCOME_UNKNOWN
    assert (letter.pipeline, letter.key) == ("task:tests.user_app.note", "note:ord-note")
    assert per_order(system.effects(), "notification") == {"ord-note": 1}
    history = system.history(str(letter.job_id))
    assert history["state"] == "dead_lettered", history
    _still_one_after_redeliveries(system)


def _still_one_after_redeliveries(system: System) -> None:
    # The redelivered message (reject on worker lost) found the key unknown: no second act.
    notes = [r for r in system.requests() if r.get("path") == "/notifications"]
    assert len(notes) == 1, notes
