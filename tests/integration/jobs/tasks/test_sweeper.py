"""The calls' sweeper on the real Postgres (and SQLite) and Redis: a call whose message was lost,
or whose owner died unrecorded, is re-sent through the user's app from the message kept with
its job — same task id, arguments and canvas — and a recorded one is not; the settings check."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa
from celery import Celery, chain, group
from kombu import Connection
from kombu.exceptions import OperationalError

from jobs import exactly_once
from jobs.engine.runtime import Runtime
from jobs.errors import TransientError
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.tasks import check_settings, dead_letter_timed_out, keep_call
from jobs.tasks.calls import SPEC_ATTRIBUTE
from jobs.tasks.sweeper import fire_call_timers, queued_calls, sweep_calls
from jobs.tools import shop
from ledger import (
    Claim,
    DeadLetterReason,
    DeadLetterStore,
    EventKind,
    JobState,
    StepLedger,
    StepState,
)
from ledger.schema import timers
from tests.conftest import queue_length
from tests.factories import RecordingDispatch
from tests.shop_app import broker_down
from tests.waiting import wait_for

RESERVATION = {"order_id": "o-9", "customer_id": "c-9", "amount": 500}


def _taken(redis_url: str) -> tuple[dict[str, Any], list[Any]]:
    """The next message on the shop's queue: its headers and body."""
    with Connection(redis_url) as conn:
        got = conn.SimpleQueue(shop.QUEUE).get(timeout=5)
        body = got.decode()
        got.ack()
    return dict(got.headers), list(body)


def test_a_published_call_whose_message_was_lost_is_re_sent_from_its_kept_message(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given a charge with a callback, published: its job is kept once the broker has it
    signature = shop.charge.s(RESERVATION).set(task_id="t-9", link=shop.notify.s())
    signature.apply_async()
    [job] = calls_ledger.store.list_jobs(pipeline="task:shop.charge")
    assert (job.state, job.context["key"], job.context["effect"]) == (
        JobState.PENDING,
        "charge:o-9",
        "charge",
    )
    assert queued_calls(shop_app) == 1

    # When the broker loses the message, and the sweeper runs past the stall time
    _taken(redis_url)
    sent = sweep_calls(calls_ledger, shop_app, stalled_after=0)

    # Then the call is on the shop's queue again: same id, arguments and callback
    assert sent == [str(job.id)]
    headers, (args, _, embed) = _taken(redis_url)
    assert (headers["id"], headers["task"], args) == ("t-9", "shop.charge", [RESERVATION])
    assert [each["task"] for each in embed["callbacks"]] == ["shop.notify"]
    kinds = [event.kind for event in calls_ledger.store.history(job.id).events]
    assert EventKind.REDRIVEN in kinds
    # and the re-send kept nothing more: still one job, and the next sweep leaves it alone
    assert len(calls_ledger.store.list_jobs(pipeline="task:shop.charge")) == 1
    assert sweep_calls(calls_ledger, shop_app) == []


def test_a_call_whose_publish_failed_is_not_kept_and_never_sent(
    calls_ledger: Runtime, shop_app: Celery
) -> None:
    # Given the shop's broker down: the caller is told its call was not sent
    with broker_down(shop_app), pytest.raises(OperationalError):
        shop.charge.apply_async((RESERVATION,), task_id="t-down", retry=False)

    # Then nothing keeps the call, so no sweep sends it behind the caller's back
    assert calls_ledger.store.list_jobs(pipeline="task:shop.charge") == []
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []
    assert queued_calls(shop_app) == 0


def test_a_call_for_later_is_not_kept_when_published(
    calls_ledger: Runtime, shop_app: Celery
) -> None:
    # The sweeper could not honour its countdown (or expiry): its job is made when it runs.
    shop.charge.apply_async((RESERVATION,), countdown=600)
    shop.charge.apply_async(({**RESERVATION, "order_id": "o-10"},), expires=600)

    assert calls_ledger.store.list_jobs(pipeline="task:shop.charge") == []
    assert queued_calls(shop_app) == 2


def test_a_call_whose_owner_died_is_re_sent_at_once(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given a kept call claimed by a worker that died (its lease ran out unrenewed)
    claim = _claimed(calls_ledger, lease=0.2)

    # When the sweeper runs (the stall time is far away)
    sent = wait_for(lambda: sweep_calls(calls_ledger, shop_app) or None, "a re-send", timeout=10)

    # Then the call is re-sent
    assert sent == [str(claim.job_id)]
    assert queue_length(redis_url, shop.QUEUE) == 1


def test_a_recorded_call_is_re_sent_until_its_continuation_appears(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given a charge with a decorated callback, recorded, whose worker died before Celery
    # published the callback (no call names it as its parent)
    shop.charge.s(RESERVATION).set(task_id="t-7", link=shop.notify.s()).apply_async()
    _taken(redis_url)
    [job] = calls_ledger.store.list_jobs(pipeline="task:shop.charge")
    assert (job.context["task_id"], job.context["hands_on"]) == ("t-7", 1)
    claim = calls_ledger.ledger.claim_step(job.id, "call")
    assert isinstance(claim, Claim)
    calls_ledger.ledger.record_success(claim, {"ok": 1}, next_step=None, duration_ms=1.0)

    # When the sweeper runs past the stall time, it re-sends the call (which answers its
    # recorded result, and Celery publishes the callback)
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == [str(job.id)]
    headers, _ = _taken(redis_url)
    assert headers["id"] == "t-7"

    # Then once the callback is kept, naming the charge as its parent, it is not sent again
    charged = {**RESERVATION, "charge_id": "ch-7"}
    keep_call("shop.notify", ([charged], {}, {}), {"id": "t-n", "parent_id": "t-7"},
              exchange="", routing_key=shop.QUEUE)  # fmt: skip
    [notify] = calls_ledger.store.list_jobs(pipeline="task:shop.notify")
    assert (notify.context["parent"], "hands_on" in notify.context) == ("t-7", False)
    # (the callback itself, kept and never claimed, is stalled: re-sent)
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == [str(notify.id)]


def test_a_recorded_call_handing_on_to_a_group_is_re_sent_until_all_its_followers_appear(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given a charge handing on to a group of two decorated calls, recorded, whose worker
    # died mid-hand-on: Celery had published the group's notify, not its note
    chain(
        shop.charge.s(RESERVATION).set(task_id="t-g"),
        group(shop.notify.s(), shop.note.si("o-9", "c-9")),
    ).apply_async()
    _taken(redis_url)
    [job] = calls_ledger.store.list_jobs(pipeline="task:shop.charge")
    claim = calls_ledger.ledger.claim_step(job.id, "call")
    assert isinstance(claim, Claim)
    calls_ledger.ledger.record_success(claim, {"ok": 1}, next_step=None, duration_ms=1.0)
    charged = {**RESERVATION, "charge_id": "ch-g"}
    keep_call("shop.notify", ([charged], {}, {}), {"id": "t-gn", "parent_id": "t-g"},
              exchange="", routing_key=shop.QUEUE)  # fmt: skip
    [notify] = calls_ledger.store.list_jobs(pipeline="task:shop.notify")
    calls_ledger.ledger.record_success(
        _claim(calls_ledger, notify.id), {"ok": 1}, next_step=None, duration_ms=1.0
    )

    # When the sweeper runs past the stall time, it re-sends the charge (one follower of
    # two is not its canvas going on): its repeat hands on to the group again
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == [str(job.id)]
    headers, _ = _taken(redis_url)
    assert headers["id"] == "t-g"

    # Then once the note is kept too, naming the charge as its parent, it is not sent again
    keep_call("shop.note", (["o-9", "c-9"], {}, {}), {"id": "t-gm", "parent_id": "t-g"},
              exchange="", routing_key=shop.QUEUE)  # fmt: skip
    [note] = calls_ledger.store.list_jobs(pipeline="task:shop.note")
    calls_ledger.ledger.record_success(
        _claim(calls_ledger, note.id), {"ok": 1}, next_step=None, duration_ms=1.0
    )
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []


def _claim(runtime: Runtime, job_id: UUID) -> Claim:
    claim = runtime.ledger.claim_step(job_id, "call")
    assert isinstance(claim, Claim)
    return claim


def test_a_call_never_claimed_is_re_sent_a_few_times_then_dead_lettered(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given a kept call that no worker ever claims (its task is registered nowhere, say),
    # and at most two re-sends
    calls_ledger.settings = calls_ledger.settings.model_copy(update={"call_max_resends": 2})
    job_id = keep_call("shop.charge", ([RESERVATION], {}, {}), {"id": "t-lost"},
                       exchange="", routing_key=shop.QUEUE)  # fmt: skip

    # When the sweeper runs past the stall time again and again, the first time with the
    # broker down (a send that fails is not a re-send)
    with broker_down(shop_app):
        assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []
    rounds = [sweep_calls(calls_ledger, shop_app, stalled_after=0) for _ in range(4)]

    # Then the call is re-sent twice, then dead-lettered with a reason a person can act on
    assert rounds == [[job_id], [job_id], [], []]
    assert queue_length(redis_url, shop.QUEUE) == 2
    assert calls_ledger.store.get_job(UUID(job_id)).state is JobState.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=calls_ledger.engine).list()
    assert (letter.reason, letter.pipeline, letter.key) == (
        DeadLetterReason.NEVER_CLAIMED,
        "task:shop.charge",
        "charge:o-9",
    )
    assert "re-sent 2 times and never claimed" in letter.message

    # and once a person replays it, it gets its re-sends again
    DeadLetterStore(engine=calls_ledger.engine).replay(letter.id, by="test", allow_unknown=False)
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == [job_id]


def test_a_call_of_a_task_the_app_does_not_have_is_dead_lettered_once_it_waited_as_long(
    calls_ledger: Runtime, shop_app: Celery
) -> None:
    # Given a call of a task renamed since: the sender's (older) app had it, and its message
    # goes to the shop's queue, whose workers drop it as unregistered
    sender = Celery("shop-before", set_as_current=False)

    @sender.task(name="shop.charge_before", shared=False)
    @exactly_once(key="charge:{order_id}")
    def charge_before(order_id: str) -> str:
        return order_id

    job_id = keep_call("shop.charge_before", (["o-11"], {}, {}), {"id": "t-11"},
                       exchange="", routing_key=shop.QUEUE)  # fmt: skip
    calls_ledger.settings = calls_ledger.settings.model_copy(update={"call_max_resends": 1})

    # When the shop's sweeper runs past the time its own calls get re-sends in
    sweep_calls(calls_ledger, shop_app, stalled_after=0)

    # Then the call is dead-lettered, naming the task and the queue
    assert calls_ledger.store.get_job(UUID(str(job_id))).state is JobState.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=calls_ledger.engine).list()
    assert letter.reason is DeadLetterReason.NEVER_CLAIMED
    assert "task 'shop.charge_before' is not a task of app 'shop'" in letter.message
    assert "queue 'shop'" in letter.message


def test_an_at_most_once_call_past_its_hard_time_limit_is_unknown_until_a_person_forces_it(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # Given an at-most-once call claimed by a run that Celery's hard time limit killed
    job_id = keep_call("shop.note", (["o-9", "c-9"], {}, {}), {"id": "t-note"},
                       exchange="", routing_key=shop.QUEUE)  # fmt: skip
    assert job_id is not None
    _claim(calls_ledger, UUID(job_id))
    note = shop.app.tasks["shop.note"]  # the task itself, as Celery's signal sends it
    spec = getattr(note.run, SPEC_ATTRIBUTE)

    # When Celery fails it in the worker's main process (a copy of the call sent under
    # another task id is another canvas's: it leaves the call alone)
    assert dead_letter_timed_out(note, spec, "t-other", ["o-9", "c-9"], {}, 1) is None
    job = dead_letter_timed_out(note, spec, "t-note", ["o-9", "c-9"], {}, 1)

    # Then it is dead-lettered, time_limit, its key unknown (it may have acted), and no
    # sweep sends it again
    assert job is not None
    assert job.state is JobState.DEAD_LETTERED
    [entry] = calls_ledger.store.history(job.id).entries
    assert entry.state is StepState.UNKNOWN
    [letter] = DeadLetterStore(engine=calls_ledger.engine).list()
    assert (letter.reason, letter.key) == (DeadLetterReason.TIME_LIMIT, "note:o-9")
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []

    # and a replay needs a person's --force, as for any unknown outcome
    desk = DeadLetterDesk(
        store=calls_ledger.store,
        letters=DeadLetterStore(engine=calls_ledger.engine),
        dispatch=RecordingDispatch(),
        calls=shop_app,
    )
    assert "--force" in str(desk.replay(letter, by="test", force=False).detail)
    assert desk.replay(letter, by="test", force=True).done
    headers, _ = _taken(redis_url)
    assert headers["id"] == "t-note"


def test_a_recorded_call_is_not_re_sent(calls_ledger: Runtime, shop_app: Celery) -> None:
    claim = _claimed(calls_ledger, lease=0.2)
    calls_ledger.ledger.record_success(claim, {"ok": True}, next_step=None, duration_ms=1.0)

    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []


_limited: list[str] = []


@shop.app.task(name="tests.rate_limited")
@exactly_once(key="limited:{order_id}")
def rate_limited(order_id: str) -> str:
    """A call the provider turns away once for an hour (a 429 with `Retry-After: 3600`)."""
    _limited.append(order_id)
    if _limited.count(order_id) == 1:
        raise TransientError("429", retry_after=3600)
    return f"done {order_id}"


def test_a_long_retry_of_a_call_is_a_timer_whose_firing_re_sends_its_message(
    calls_ledger: Runtime, shop_app: Celery, redis_url: str
) -> None:
    # A call turned away for an hour: no countdown message, a timer row
    order, task_id = f"o-{uuid4().hex[:8]}", f"t-{uuid4().hex[:8]}"
    assert rate_limited.apply(args=(order,), task_id=task_id).state == "RETRY"
    [job] = calls_ledger.store.list_jobs(pipeline="task:tests.rate_limited")
    with calls_ledger.engine.connect() as conn:
        [row] = conn.execute(sa.select(timers).where(timers.c.job_id == job.id)).all()
    assert (row.step, row.kind, row.state) == ("call", "retry", "pending")
    assert queued_calls(shop_app) == 0
    assert sweep_calls(calls_ledger, shop_app, stalled_after=0) == []  # waiting, not stalled
    assert fire_call_timers(calls_ledger, shop_app) == 0  # not due
    # A copy of its message meanwhile (a redelivery) is not run before the timer is due
    assert rate_limited.apply(args=(order,), task_id=task_id).state == "RETRY"
    assert _limited.count(order) == 1

    # When it is due (moved to now: the honest way not to wait an hour), it fires once and
    # the call's kept message is sent again through its app: same task id and arguments
    with calls_ledger.engine.begin() as conn:
        conn.execute(sa.update(timers).values(due_at=sa.func.now()))
    assert fire_call_timers(calls_ledger, shop_app) == 1
    assert fire_call_timers(calls_ledger, shop_app) == 0
    headers, (args, _, _) = _taken(redis_url)
    assert (headers["id"], headers["task"], args) == (task_id, "tests.rate_limited", [order])
    assert rate_limited.apply(args=(order,), task_id=task_id).get() == f"done {order}"
    assert _limited.count(order) == 2


def _claimed(runtime: Runtime, *, lease: float) -> Claim:
    """A charge call kept as its publish keeps it, then claimed by an owner."""
    job_id = keep_call(
        "shop.charge", ([RESERVATION], {}, {}), {"id": "t-8"}, exchange="", routing_key=shop.QUEUE
    )
    assert job_id is not None
    ledger = StepLedger(engine=runtime.engine, lease_seconds=lease)
    claim = ledger.claim_step(UUID(job_id), "call")
    assert isinstance(claim, Claim)
    return claim


def test_the_settings_check_names_what_is_missing() -> None:
    lax_app = Celery("lax", broker="redis://127.0.0.1:6379/0", set_as_current=False)

    @lax_app.task
    @exactly_once(key="k:{a}")
    def lax(a: int) -> int:
        return a

    problems = check_settings(lax_app)
    assert any("acks_late is off" in p for p in problems), problems
    assert any("reject_on_worker_lost is off" in p for p in problems), problems
    assert any("visibility_timeout (3600 s)" in p for p in problems), problems
    assert check_settings(shop.app) == []
