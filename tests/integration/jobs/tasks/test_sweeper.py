"""The calls' sweeper on the real Postgres and Redis: a call whose owner died unrecorded is
re-sent through the user's app from the message kept with its job — same task id, same
arguments, same canvas — and a recorded one is not; and the worker's settings check."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from jobs import exactly_once
from jobs.engine.runtime import Runtime
from jobs.tasks import check_settings
from jobs.tasks.calls import Call
from jobs.tasks.running import pipeline_for
from jobs.tasks.sweeper import decorated_tasks, sweep_calls
from ledger import Claim, EventKind, StepLedger
from tests import user_app
from tests.waiting import wait_for


@pytest.fixture
def proj(redis_url: str) -> Iterator[tuple[Celery, str]]:
    queue = f"proj-{uuid.uuid4().hex[:8]}"
    conf = user_app.app.conf
    saved = {"broker_url": conf.broker_url, "task_default_queue": conf.task_default_queue}
    conf.update(broker_url=redis_url, task_default_queue=queue)
    yield user_app.app, queue
    user_app.app.close()
    conf.update(saved)


def _claimed_call(runtime: Runtime, message: dict[str, Any], lease: float) -> Claim:
    """A call's job as a worker creates it, claimed by an owner that then dies."""
    spec = decorated_tasks(user_app.app)["tests.user_app.charge"]
    pipeline_for("tests.user_app.charge", spec)
    call = Call.bind("tests.user_app.charge", spec, (None, message["args"][0]), {}, bound=True)
    [(job_id, _)] = runtime.store.create_jobs([call.new_job(message)], dispatched=True)
    ledger = StepLedger(engine=runtime.engine, lease_seconds=lease)
    claim = ledger.claim_step(job_id, "call")
    assert isinstance(claim, Claim)
    return claim


def test_a_call_whose_owner_died_is_re_sent_from_its_kept_message(
    runtime: Runtime, proj: tuple[Celery, str], redis_url: str
) -> None:
    # Given a charge call sent with a callback, claimed by a worker that died (its lease ran out)
    app, queue = proj
    reservation = {"order_id": "o-9", "customer_id": "c-9", "amount": 5}
    signature = user_app.charge.s(reservation).set(task_id="t-9", link=user_app.notify.s())
    message = dict(signature)
    claim = _claimed_call(runtime, message, lease=0.2)

    # When the sweeper of the user's app runs, once the lease ran out
    sent = wait_for(lambda: sweep_calls(runtime, app) or None, "a re-send", timeout=10)

    # Then the call is on the user's queue again: same id, arguments and callback
    assert sent == [str(claim.job_id)]
    with Connection(redis_url) as conn:
        got = conn.SimpleQueue(queue).get(timeout=5)
        body = got.decode()
        got.ack()
    assert got.headers["id"] == "t-9"
    assert got.headers["task"] == "tests.user_app.charge"
    args, _, embed = body
    assert args == [reservation]
    assert [each["task"] for each in embed["callbacks"]] == ["tests.user_app.notify"]
    kinds = [event.kind for event in runtime.store.history(claim.job_id).events]
    assert EventKind.REDRIVEN in kinds
    # and a second sweep leaves it alone until it stalls again
    assert sweep_calls(runtime, app) == []


def test_a_recorded_call_is_not_re_sent(runtime: Runtime, proj: tuple[Celery, str]) -> None:
    app, _ = proj
    message = dict(user_app.charge.s({"order_id": "o-8", "customer_id": "c", "amount": 1}))
    claim = _claimed_call(runtime, message, lease=0.2)
    runtime.ledger.record_success(claim, {"ok": True}, next_step=None, duration_ms=1.0)

    assert sweep_calls(runtime, app, stalled_after=0) == []


def test_the_settings_check_names_what_is_missing() -> None:
    app = Celery("lax", broker="redis://127.0.0.1:6379/0", set_as_current=False)

    @app.task
    @exactly_once(key="k:{a}")
    def lax(a: int) -> int:
        return a

    problems = check_settings(app)
    assert any("acks_late is off" in p for p in problems), problems
    assert any("reject_on_worker_lost is off" in p for p in problems), problems
    assert any("visibility_timeout (3600 s)" in p for p in problems), problems
    assert check_settings(user_app.app) == []
