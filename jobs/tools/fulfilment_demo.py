"""`oncelery demo --pipeline order-fulfilment`: the sandbox, real workers and beat (the timer
loop), N generated orders, half of them signalled `shipped` (some before their job reaches its
wait, some twice), a short reminder timeout for the rest; then what the audit counts."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

from config import Settings
from jobs.engine.enqueue import start_jobs
from jobs.engine.runtime import Runtime
from jobs.orders import SHIPPED, order_fulfilment
from jobs.pipelines import Pipeline
from jobs.tools.harness import Harness, Progress
from jobs.tools.shipping import ShippingPlan, Warehouse, python_sender
from jobs.worker import CeleryDispatch
from ledger import JSON, EventKind, JobState, SignalLedger


@dataclass(frozen=True)
class FulfilmentDemoOptions:
    """What the demo runs."""

    orders: int = 200
    #: Seconds an order waits for its signal (`ONCELERY_SHIP_REMINDER_AFTER` of the workers).
    reminder_after: float = 8.0
    #: The sandbox's fault options (`--fault-rate 0.1`, …).
    sandbox: list[str] = field(default_factory=list)
    workers: int = 2
    concurrency: int = 2
    timeout: float = 600.0


@dataclass(frozen=True)
class FulfilmentDemoReport:
    """The demo's figures, counted at the provider by the audit and in the waits' results."""

    orders: int
    completed: int
    dead_lettered: int
    stuck: int
    charges: int
    duplicate_charges: int
    notifications: int
    duplicate_notifications: int
    #: Signals sent (a duplicate sent twice counts twice), early ones (before any wait), and
    #: what they answered.
    signals_sent: int
    signals_early: int
    signals_recorded: int
    signals_duplicate: int
    #: How the orders' waits ended, and the shipping notices the provider applied.
    waits_by_signal: int
    waits_by_timeout: int
    order_shipped: int
    ship_reminders: int
    #: Signals no wait took (each came after its order's timeout fired).
    signals_kept: int
    retries: int
    seconds: float
    audit_clean: bool
    drift: list[dict[str, JSON]] = field(default_factory=list)
    logs: str = ""

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return asdict(self)


def run_fulfilment_demo(
    settings: Settings, options: FulfilmentDemoOptions, progress: Progress
) -> FulfilmentDemoReport:
    """Run the demo from start to finish; every process it starts is stopped before it
    returns."""
    env = {"ONCELERY_SHIP_REMINDER_AFTER": str(options.reminder_after)}
    harness = Harness.prepare(settings, "fulfil", env)
    pipeline: Pipeline[object] = order_fulfilment  # type: ignore[assignment]
    rt = Runtime.from_settings(settings, engine=harness.store.engine)
    try:
        hang = str(max(1.0, settings.provider_timeout * 2))
        harness.start_sandbox([*options.sandbox, "--hang-seconds", hang])
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        harness.start_beat()
        orders = harness.orders(options.orders)
        plan = ShippingPlan.for_orders([order.order_id for order in orders])
        warehouse = Warehouse(plan, [("python", python_sender(rt, CeleryDispatch()))])
        began = time.monotonic()
        new_jobs = [
            pipeline.new_job(order.event_id, order.model_dump(mode="json", exclude={"event_id"}))
            for order in orders
        ]
        # Shipped before their jobs even exist: kept, each for its order's wait to come.
        warehouse.ship_early()
        enqueued = start_jobs(harness.store, CeleryDispatch(), pipeline, new_jobs)

        def ship_waiting() -> None:
            warehouse.ship_waiting(harness.store, harness.prefix)

        counts = harness.wait(len(orders), options.timeout, progress, ship_waiting)
        seconds = time.monotonic() - began
        audit = harness.audit(pipeline)
        job_ids = [uuid.UUID(item.job_id) for item in enqueued]
        retries = harness.store.count_events(EventKind.FAILED, job_ids)
        keep_for = harness.settings.signal_keep_for
        signals = SignalLedger(engine=harness.store.engine, keep_for=keep_for)
        kept = signals.kept(SHIPPED, [order.order_id for order in orders])
    finally:
        harness.stop()
    fulfilment = audit.fulfilment or {}
    return FulfilmentDemoReport(
        orders=len(orders),
        completed=counts[JobState.SUCCEEDED],
        dead_lettered=counts[JobState.DEAD_LETTERED],
        stuck=counts[JobState.PENDING] + counts[JobState.RUNNING],
        charges=audit.effects.get("charge", 0),
        duplicate_charges=audit.duplicates.get("charge", 0),
        notifications=audit.effects.get("notification", 0),
        duplicate_notifications=audit.duplicates.get("notification", 0),
        signals_sent=sum(warehouse.answers.values()),
        signals_early=len(plan.early) + len(plan.twice.intersection(plan.early)),
        signals_recorded=warehouse.answers["recorded"],
        signals_duplicate=warehouse.answers["duplicate"],
        waits_by_signal=int(str(fulfilment.get("signalled", 0))),
        waits_by_timeout=int(str(fulfilment.get("timed_out", 0))),
        order_shipped=int(str(fulfilment.get("order_shipped", 0))),
        ship_reminders=int(str(fulfilment.get("ship_reminders", 0))),
        signals_kept=kept,
        retries=retries,
        seconds=round(seconds, 2),
        audit_clean=audit.clean and not warehouse.failures,
        drift=[d.as_json() for d in audit.drift]
        + [{"problem": "signal_not_sent", "detail": failure} for failure in warehouse.failures],
        logs=str(harness.log_dir),
    )
