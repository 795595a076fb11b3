"""`jobs.ops.fulfilment_audit`: each fulfilment order has exactly one shipping notice, the one
its wait's recorded result says, and none before its wait ended."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from jobs.ops.effects import Effect
from jobs.ops.fulfilment_audit import audit_fulfilment
from ledger import JSON, Job, JobState

AT = datetime(2026, 1, 1, tzinfo=UTC)


def job(order_id: str, by: str | None, state: JobState = JobState.SUCCEEDED) -> Job:
    results: dict[str, JSON] = {} if by is None else {"wait_shipped": {"by": by}}
    return Job(
        id=uuid.uuid4(),
        pipeline="order-fulfilment",
        event_id=f"e-{order_id}",
        state=state,
        context={"order_id": order_id},
        fingerprint="f",
        step_keys={},
        results=results,
        current_step=None if state is JobState.SUCCEEDED else "wait_shipped",
        created_at=AT,
        updated_at=AT,
        finished_at=None,
    )


def notice(order_id: str, template: str) -> Effect:
    return Effect("notification", f"fulfil:{order_id}:shipping", order_id, template=template)


def test_the_right_notice_once_is_clean_and_counted() -> None:
    jobs = [job("o1", "signal"), job("o2", "timeout"), job("o3", None, JobState.RUNNING)]
    effects = [
        notice("o1", "order_shipped"),
        notice("o2", "ship_reminder"),
        Effect("notification", "fulfil:o1:notify", "o1", template="order_confirmed"),
    ]

    figures, drift = audit_fulfilment(jobs, effects)

    assert drift == []
    assert (figures.orders, figures.waiting, figures.signalled, figures.timed_out) == (3, 1, 1, 1)
    assert (figures.order_shipped, figures.ship_reminders) == (1, 1)


@pytest.mark.parametrize(
    ("by", "state", "templates", "problem"),
    [
        ("signal", JobState.SUCCEEDED, ["ship_reminder"], "wrong_shipping_notice"),
        ("timeout", JobState.SUCCEEDED, ["order_shipped"], "wrong_shipping_notice"),
        (
            "signal",
            JobState.SUCCEEDED,
            ["order_shipped", "ship_reminder"],
            "shipping_notices_for_order",
        ),
        (
            "timeout",
            JobState.SUCCEEDED,
            ["ship_reminder", "ship_reminder"],
            "shipping_notices_for_order",
        ),
        (None, JobState.RUNNING, ["order_shipped"], "shipping_notice_before_wait"),
        ("signal", JobState.SUCCEEDED, [], "shipping_notice_missing"),
    ],
)
def test_a_wrong_missing_early_or_second_notice_is_drift(
    by: str | None, state: JobState, templates: list[str], problem: str
) -> None:
    _, drift = audit_fulfilment([job("o1", by, state)], [notice("o1", t) for t in templates])

    assert [(d.problem, d.order_id) for d in drift] == [(problem, "o1")]


def test_other_pipelines_orders_are_left_out() -> None:
    placed = job("o1", None)
    other = Job(**{**placed.__dict__, "pipeline": "order-placed"})

    figures, drift = audit_fulfilment([other], [notice("o1", "order_shipped")])

    assert (figures.orders, drift) == (0, [])
