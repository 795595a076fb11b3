"""How decorated calls of a user's own app end, run by one real worker of it started once for
the module: a revoked call is cancelled and never re-sent; a late repeat of a call whose chain
already went on does not hand it on a second time; a call Celery's hard time limit killed is
dead-lettered, as Celery failed it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import chain

from jobs.ops.dead_letters import DeadLetterDesk
from jobs.tasks import resend
from jobs.tasks.running import close_runtime, runtime
from jobs.tasks.sweeper import sweep_calls
from jobs.tools import processes, shop
from jobs.tools.databases import drop_database
from ledger import DeadLetterReason, DeadLetterStore, EventKind, Job, JobState
from tests.conftest import POSTGRES_URL, REDIS_URL, forget_everything, queue_length
from tests.factories import RecordingDispatch
from tests.shop_app import shop_on
from tests.system.conftest import System, build_system, per_order

pytestmark = pytest.mark.system

#: Short leases and stall time: a call left pending is re-sent within seconds.
FAST = {
    "ONCELERY_STEP_LEASE": "2",
    "ONCELERY_SWEEP_INTERVAL": "1",
    "ONCELERY_SWEEP_STALLED_AFTER": "3",
}


@pytest.fixture(scope="module")
def shop_system(
    postgres_admin: sa.Engine, postgres_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """A database, a sandbox and one shop worker on this test process's Redis, for the
    module; this process sends the shop's tasks as its code would (`DATABASE_URL` set)."""
    name = f"oncelery_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    url = sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    forget_everything(REDIS_URL)
    folder: Path = tmp_path_factory.mktemp("shop")
    try:
        system = build_system(folder, database_url=url, broker_url=REDIS_URL, workers=0)
        try:
            system.start_shop_worker("shop0", concurrency=1, extra_env=FAST)
            with pytest.MonkeyPatch.context() as patch, shop_on(REDIS_URL) as app:
                patch.setenv("DATABASE_URL", url)
                system.wait_for(lambda: bool(app.control.ping(timeout=0.5)), "the worker")
                yield system
        finally:
            close_runtime()
            processes.stop_all(system.started)
            system.store.engine.dispose()
    finally:
        forget_everything(REDIS_URL)
        drop_database(postgres_admin, name)


def calls_of(system: System, task: str, task_id: str) -> list[Job]:
    """The jobs of the calls of `task` sent with `task_id` (one, once it is kept)."""
    jobs = system.store.list_jobs(pipeline=f"task:shop.{task}", limit=1000)
    return [job for job in jobs if job.context.get("task_id") == task_id]


def call_of(system: System, task: str, task_id: str) -> Job:
    [job] = calls_of(system, task, task_id)
    return job


def kinds(system: System, job: Job) -> list[EventKind]:
    return [event.kind for event in system.store.history(job.id).events]


def test_a_revoked_call_is_cancelled_never_re_sent_and_never_acts(shop_system: System) -> None:
    system = shop_system
    order = f"ord-{uuid.uuid4().hex[:6]}"
    task_id = f"revoked-{order}"
    with shop_on(REDIS_URL) as app:
        # Given a call revoked (the worker has taken the revocation in) before it ran
        assert app.control.revoke(task_id, reply=True, timeout=5, limit=1)

        # When it is sent
        reservation = {"order_id": order, "customer_id": f"cust-{order}", "amount": 100}
        shop.charge.apply_async((reservation,), task_id=task_id)
        job = call_of(system, "charge", task_id)

        # Then its job ends cancelled, rather than pending for the sweeper to send again
        def ended_or_re_sent() -> bool:
            return system.store.get_job(
                job.id
            ).state is not JobState.PENDING or EventKind.REDRIVEN in kinds(system, job)

        system.wait_for(ended_or_re_sent, "the revoked call to be dealt with", timeout=30)
        assert (system.store.get_job(job.id).state, kinds(system, job)) == (
            JobState.CANCELLED,
            [EventKind.CANCELLED],
        )
        # and no sweep takes it
        assert str(job.id) not in sweep_calls(runtime(), app, stalled_after=0)
    # and it never charged
    assert per_order(system.effects(), "charge") == {}


def test_a_late_repeat_of_a_call_whose_chain_went_on_does_not_hand_on_again(
    shop_system: System,
) -> None:
    system = shop_system
    order = f"ord-{uuid.uuid4().hex[:6]}"
    reserve_id, charge_id = f"reserve-{order}", f"charge-{order}"
    worker_log = next(p for p in system.started if p.name == "shop0").log_path
    with shop_on(REDIS_URL) as app:
        # Given a chain reserve → charge that went through
        chain(
            shop.reserve.s(order, f"cust-{order}", "SKU-1", 1).set(task_id=reserve_id),
            shop.charge.s().set(task_id=charge_id),
        ).apply_async()
        system.wait_for(
            lambda: (
                [job.state for job in calls_of(system, "charge", charge_id)] == [JobState.SUCCEEDED]
            ),
            "the chain to go through",
        )

        # When the reserve's message comes once more (a late Redis redelivery)
        resend(app, call_of(system, "reserve", reserve_id).context["message"])

        # Then the repeat is answered, and the charge is not handed on again
        def seen(text: str) -> int:
            return worker_log.read_text().count(text)

        def repeat_done() -> bool:
            done = seen(f"shop.reserve[{reserve_id}] succeeded") + seen(
                f"shop.reserve[{reserve_id}] ignored"
            )
            return done == 2 and queue_length(REDIS_URL, shop.QUEUE) == 0

        system.wait_for(repeat_done, "the repeat to be answered")
        assert seen(f"Task shop.charge[{charge_id}] received") == 1
    assert per_order(system.effects(), "charge") == {order: 1}


def test_a_call_past_its_hard_time_limit_is_dead_lettered_as_celery_failed_it(
    shop_system: System,
) -> None:
    system = shop_system
    order = f"ord-{uuid.uuid4().hex[:6]}"
    task_id = f"limited-{order}"
    reservation = {"order_id": order, "customer_id": f"cust-{order}", "amount": 100}
    worker_log = next(p for p in system.started if p.name == "shop0").log_path
    with shop_on(REDIS_URL) as app:
        # Given a charge with an errback, whose provider answers after its hard time limit
        system.faults(service="payments", latency_ms=4000)
        try:
            shop.charge.apply_async(
                (reservation,),
                task_id=task_id,
                time_limit=1,
                link_error=shop.note.si(order, f"cust-{order}"),
            )
            # When Celery kills its pool process, and tells its canvas it failed
            system.wait_for(
                lambda: f"exceeded for shop.charge[{task_id}]" in worker_log.read_text(),
                "the hard time limit",
            )
        finally:
            system.faults(service="payments", latency_ms=0)
        job = call_of(system, "charge", task_id)
        system.wait_for(
            lambda: per_order(system.effects(), "notification").get(order) == 1,
            "the errback",
        )

        # Then the call's job is dead-lettered, time_limit, as Celery failed it: no sweep
        # sends it again to succeed behind the errback's back
        system.wait_for(
            lambda: (
                system.store.get_job(job.id).state in (JobState.DEAD_LETTERED, JobState.SUCCEEDED)
            ),
            "the call to end",
            timeout=30,
        )
        assert system.store.get_job(job.id).state is JobState.DEAD_LETTERED
        [letter] = DeadLetterStore(engine=system.store.engine).list(job_id=job.id)
        assert letter.reason is DeadLetterReason.TIME_LIMIT
        assert str(job.id) not in sweep_calls(runtime(), app, stalled_after=0)
        assert EventKind.REDRIVEN not in kinds(system, job)

        # and a person's replay runs it again, its key making the repeat safe
        desk = DeadLetterDesk(
            store=system.store,
            letters=DeadLetterStore(engine=system.store.engine),
            dispatch=RecordingDispatch(),
            calls=app,
        )
        assert desk.replay(letter, by="test", force=False).done
        system.wait_for(
            lambda: system.store.get_job(job.id).state is JobState.SUCCEEDED, "the replay"
        )
    assert per_order(system.effects(), "charge").get(order) == 1
