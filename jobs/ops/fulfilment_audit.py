"""The order-fulfilment part of the audit: each fulfilment order got exactly one shipping
notice — `order_shipped` when its wait's recorded result says the signal came first,
`ship_reminder` when its timeout did — and none before its wait ended."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from jobs.ops.effects import Drift, Effect
from jobs.orders.fulfilment import ORDER_FULFILMENT
from jobs.orders.steps.shipping import TEMPLATES, WAIT_STEP
from ledger import JSON, Job, JobState

#: The notices a fulfilment order may get after its wait (one of them, once).
NOTICES = frozenset(TEMPLATES.values())


@dataclass(frozen=True)
class FulfilmentFigures:
    """The fulfilment orders, counted at the provider and in their waits' results."""

    orders: int
    #: Orders still waiting (or not at their wait yet), past it, and how their waits ended.
    waiting: int
    signalled: int
    timed_out: int
    order_shipped: int
    ship_reminders: int

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return dict(asdict(self))


def audit_fulfilment(
    jobs: Sequence[Job], effects: Sequence[Effect]
) -> tuple[FulfilmentFigures, list[Drift]]:
    """Check each fulfilment job's shipping notices against its wait's result.

    Args:
        jobs: the order-fulfilment jobs to audit (others are left out).
        effects: the provider's effects (any; each order takes its own notices).
    """
    notices: dict[str, list[Effect]] = defaultdict(list)
    for effect in effects:
        if effect.kind == "notification" and effect.template in NOTICES and effect.order_id:
            notices[effect.order_id].append(effect)
    drift: list[Drift] = []
    ended = {"signal": 0, "timeout": 0}
    ours = [job for job in jobs if job.pipeline == ORDER_FULFILMENT]
    for job in ours:
        order_id = str(job.context.get("order_id"))
        sent = notices.get(order_id, [])
        waited = job.results.get(WAIT_STEP)
        by = waited.get("by") if isinstance(waited, dict) else None
        if isinstance(by, str) and by in ended:
            ended[by] += 1
        drift.extend(_check(job, order_id, by, sent))
    shipped = sum(1 for each in notices.values() for e in each if e.template == "order_shipped")
    figures = FulfilmentFigures(
        orders=len(ours),
        waiting=len(ours) - ended["signal"] - ended["timeout"],
        signalled=ended["signal"],
        timed_out=ended["timeout"],
        order_shipped=shipped,
        ship_reminders=sum(len(each) for each in notices.values()) - shipped,
    )
    return figures, drift


def _check(job: Job, order_id: str, by: object, sent: list[Effect]) -> list[Drift]:
    """The drift of one order: two notices, the wrong one, one before its wait ended, or
    none for an order that succeeded."""
    key = sent[0].idempotency_key if sent else None
    templates = sorted(str(effect.template) for effect in sent)
    if len(sent) > 1:
        detail = f"{len(sent)} shipping notices ({', '.join(templates)}) for job {job.id}"
        return [Drift("shipping_notices_for_order", "notification", key, order_id, detail)]
    if not isinstance(by, str) or by not in TEMPLATES:
        if sent:
            detail = f"{templates[0]} sent while job {job.id}'s wait has not ended"
            return [Drift("shipping_notice_before_wait", "notification", key, order_id, detail)]
        return []
    if sent and sent[0].template != TEMPLATES[by]:
        detail = f"{templates[0]} sent, but job {job.id}'s wait ended by {by}: {TEMPLATES[by]}"
        return [Drift("wrong_shipping_notice", "notification", key, order_id, detail)]
    if not sent and job.state is JobState.SUCCEEDED:
        detail = f"job {job.id} succeeded; its wait ended by {by}, and no {TEMPLATES[by]} came"
        return [Drift("shipping_notice_missing", "notification", None, order_id, detail)]
    return []
