"""`exactly_once` on the user's own Celery app (`jobs.tools.shop`), its calls run in this
process (`Task.apply`) on the real Postgres and a real sandbox, counted at the sandbox."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from jobs import Delivery, exactly_once
from jobs.errors import CallDeadLettered, NotInCall
from jobs.tasks import cancel_revoked, idempotency_key, keep_call
from jobs.tasks.calls import SPEC_ATTRIBUTE
from jobs.tools import shop
from ledger import DeadLetterReason, DeadLetterStore, JobState, JobStore


def requests_with_key(sandbox: str, key: str) -> int:
    rows = httpx.get(f"{sandbox}/sandbox/requests", timeout=10).json()
    return sum(1 for row in rows if row.get("idempotency_key") == key)


def run(task: Any, *args: Any) -> Any:
    return task.apply(args=args, throw=True).get()


def test_a_repeat_returns_the_recorded_value_without_running_the_body(
    sandbox: str, ledger_engine: sa.Engine
) -> None:
    reservation = {"order_id": "o-1", "customer_id": "c-1", "amount": 1200}

    first = run(shop.charge, reservation)
    again = run(shop.charge, reservation)

    assert again == first
    assert first["charge_id"]
    assert requests_with_key(sandbox, "charge:o-1") == 1
    jobs = JobStore(engine=ledger_engine).list_jobs(pipeline="task:shop.charge")
    assert [(job.state, job.results["call"]) for job in jobs] == [(JobState.SUCCEEDED, first)]


def test_the_same_key_with_other_arguments_is_dead_lettered_not_adopted(
    sandbox: str, ledger_engine: sa.Engine
) -> None:
    run(shop.charge, {"order_id": "o-2", "customer_id": "c-2", "amount": 100})

    with pytest.raises(CallDeadLettered, match="fingerprint_mismatch"):
        run(shop.charge, {"order_id": "o-2", "customer_id": "c-2", "amount": 999})

    assert requests_with_key(sandbox, "charge:o-2") == 1
    [letter] = DeadLetterStore(engine=ledger_engine).list()
    assert (letter.reason, letter.key) == (DeadLetterReason.FINGERPRINT_MISMATCH, "charge:o-2")


def test_a_permanent_failure_is_dead_lettered_once(sandbox: str) -> None:
    # A declined card: 402, permanent; the repeat does not charge again either.
    declined = {"order_id": "o-3", "customer_id": "declined-1", "amount": 100}
    with pytest.raises(CallDeadLettered, match="permanent"):
        run(shop.charge, declined)
    with pytest.raises(CallDeadLettered, match="permanent"):
        run(shop.charge, declined)

    assert requests_with_key(sandbox, "charge:o-3") == 1


def test_idempotency_key_is_the_claimed_key_and_only_inside_a_call(sandbox: str) -> None:
    del sandbox
    seen: list[str] = []

    @shop.app.task(name="tests.seen_key")
    @exactly_once(key="seen:{a}-{b[c]}")
    def seen_key(a: int, b: dict[str, str]) -> int:
        seen.append(idempotency_key())
        return a

    assert run(seen_key, 7, {"c": "x"}) == 7
    assert seen == ["seen:7-x"]
    with pytest.raises(NotInCall):
        idempotency_key()


def test_a_template_naming_no_argument_is_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match="has no argument 'order_id'"):

        @exactly_once(key="charge:{order_id}")
        def charge(order: str) -> None:
            del order

    with pytest.raises(ValueError, match="read-only"):
        exactly_once(key="k:{a}", delivery=Delivery.READ_ONLY)(lambda a: a)


def test_a_revoked_call_is_cancelled_and_a_repeat_of_it_does_not_act(
    sandbox: str, ledger_engine: sa.Engine
) -> None:
    reservation = {"order_id": "o-5", "customer_id": "c-5", "amount": 100}
    job_id = keep_call("shop.charge", ([reservation], {}, {}), {"id": "t-5"},
                       exchange="", routing_key=shop.QUEUE)  # fmt: skip
    spec = getattr(shop.charge.run, SPEC_ATTRIBUTE)

    # A revoke of another copy of the call (sent again under another id) leaves it alone
    assert cancel_revoked(shop.charge, spec, "t-other", [reservation], {}) is None
    cancelled = cancel_revoked(shop.charge, spec, "t-5", [reservation], {})

    assert cancelled is not None
    assert (str(cancelled.id), cancelled.state) == (job_id, JobState.CANCELLED)
    assert str(shop.charge.apply(args=(reservation,), task_id="t-5").state) == "IGNORED"
    assert requests_with_key(sandbox, "charge:o-5") == 0

    # A call revoked before its sender kept it (a worker dropped its message first): its
    # job is made cancelled, and the sender's keep leaves it so
    early = {**reservation, "order_id": "o-6"}
    made = cancel_revoked(shop.charge, spec, "t-6", [early], {})
    assert made is not None
    assert made.state is JobState.CANCELLED
    kept = keep_call("shop.charge", ([early], {}, {}), {"id": "t-6"},
                     exchange="", routing_key=shop.QUEUE)  # fmt: skip
    assert kept == str(made.id)
    assert JobStore(engine=ledger_engine).get_job(made.id).state is JobState.CANCELLED
