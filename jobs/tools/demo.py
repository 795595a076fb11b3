"""`oncelery demo`: start the sandbox and real workers, enqueue generated orders, wait for
them, and report what the audit counts at the provider."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

from config import Settings
from jobs.orders import enqueue_orders
from jobs.tools.harness import Harness, Progress
from jobs.worker import CeleryDispatch
from ledger import JSON, EventKind, JobState


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    orders: int = 200
    fault_rate: float = 0.0
    timeout_rate: float = 0.0
    lost_reply_rate: float = 0.0
    latency_ms: int = 0
    declined_rate: float = 0.0
    workers: int = 2
    concurrency: int = 2
    timeout: float = 600.0
    seed: int | None = None


@dataclass(frozen=True)
class DemoReport:
    """The demo's figures, counted at the provider by the audit."""

    orders: int
    completed: int
    dead_lettered: int
    stuck: int
    charges: int
    duplicate_charges: int
    notifications: int
    duplicate_notifications: int
    retries: int
    seconds: float
    audit_clean: bool
    drift: list[dict[str, JSON]] = field(default_factory=list)
    database: str = ""
    broker: str = ""
    logs: str = ""

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return asdict(self)


def run_demo(settings: Settings, options: DemoOptions, progress: Progress) -> DemoReport:
    """Run the demo from start to finish; every process it starts is stopped before it returns."""
    harness = Harness.prepare(settings, "demo")
    faults = [
        "--fault-rate",
        str(options.fault_rate),
        "--timeout-rate",
        str(options.timeout_rate),
        "--lost-reply-rate",
        str(options.lost_reply_rate),
        "--latency-ms",
        str(options.latency_ms),
        "--hang-seconds",
        str(max(1.0, settings.provider_timeout * 2)),
    ]
    try:
        harness.start_sandbox(faults)
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        orders = harness.orders(
            options.orders, declined_rate=options.declined_rate, seed=options.seed
        )
        began = time.monotonic()
        enqueued = enqueue_orders(harness.store, CeleryDispatch(), orders)
        counts = harness.wait(len(orders), options.timeout, progress)
        seconds = time.monotonic() - began
        audit = harness.audit()
        job_ids = [uuid.UUID(item.job_id) for item in enqueued]
        retries = harness.store.count_events(EventKind.FAILED, job_ids)
    finally:
        harness.stop()
    return DemoReport(
        orders=len(orders),
        completed=counts[JobState.SUCCEEDED],
        dead_lettered=counts[JobState.DEAD_LETTERED],
        stuck=counts[JobState.PENDING] + counts[JobState.RUNNING],
        charges=audit.effects.get("charge", 0),
        duplicate_charges=audit.duplicates.get("charge", 0),
        notifications=audit.effects.get("notification", 0),
        duplicate_notifications=audit.duplicates.get("notification", 0),
        retries=retries,
        seconds=round(seconds, 2),
        audit_clean=audit.clean,
        drift=[d.as_json() for d in audit.drift],
        database=harness.store.engine.url.render_as_string(hide_password=True),
        broker=settings.broker_kind,
        logs=str(harness.log_dir),
    )
