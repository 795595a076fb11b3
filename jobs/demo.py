"""`oncelery demo`: start the sandbox and real workers, enqueue generated orders, wait for
them, and report what the audit counts at the provider."""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from config import Settings, child_environment, prepare_broker
from jobs import processes
from jobs.app import CeleryDispatch
from jobs.audit import AuditReport, Scope, effect_steps, fetch_effects, reconcile
from jobs.enqueue import enqueue_orders
from jobs.errors import ProcessFailed
from jobs.orders import OrderItem, OrderPlaced, order_placed
from ledger import JSON, EventKind, JobState, JobStore, create_engine, upgrade

#: Called with (finished, total) while the demo waits.
Progress = Callable[[int, int], None]


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


def generate_orders(
    count: int, prefix: str, *, declined_rate: float, seed: int | None
) -> list[OrderPlaced]:
    """`count` orders whose event and order ids start with `prefix`."""
    rng = random.Random(seed)
    orders = []
    for number in range(count):
        declined = rng.random() < declined_rate
        customer = f"declined-{number % 7}" if declined else f"cust-{number % 50}"
        items = [
            OrderItem(sku=f"SKU-{rng.randrange(1, 40)}", quantity=rng.randrange(1, 4))
            for _ in range(rng.randrange(1, 4))
        ]
        orders.append(
            OrderPlaced(
                event_id=f"{prefix}{number}",
                order_id=f"{prefix}{number}",
                customer_id=customer,
                currency="EUR",
                items=items,
            )
        )
    return orders


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM's default kills us on the spot, leaving the workers and sandbox behind.
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(settings: Settings, options: DemoOptions, progress: Progress) -> DemoReport:
    """Run the demo from start to finish; every process it starts is stopped before it returns."""
    signal.signal(signal.SIGTERM, _terminate)
    engine = create_engine(settings.database_url)
    upgrade(engine)
    prepare_broker(settings)
    store = JobStore(engine=engine)
    prefix = f"demo-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-"
    log_dir = (settings.data_dir / "logs").resolve()
    started: list[processes.ManagedProcess] = []
    try:
        _start_services(settings, options, log_dir, started)
        orders = generate_orders(
            options.orders, prefix, declined_rate=options.declined_rate, seed=options.seed
        )
        began = time.monotonic()
        enqueued = enqueue_orders(store, CeleryDispatch(), orders)
        counts = _wait(store, prefix, len(orders), options.timeout, progress)
        seconds = time.monotonic() - began
        audit = _audit(settings, store, prefix)
    finally:
        processes.stop_all(started)
        engine.dispose()
    job_ids = [uuid.UUID(item.job_id) for item in enqueued]
    return DemoReport(
        orders=len(orders),
        completed=counts[JobState.SUCCEEDED],
        dead_lettered=counts[JobState.DEAD_LETTERED],
        stuck=counts[JobState.PENDING] + counts[JobState.RUNNING],
        charges=audit.effects.get("charge", 0),
        duplicate_charges=audit.duplicates.get("charge", 0),
        notifications=audit.effects.get("notification", 0),
        duplicate_notifications=audit.duplicates.get("notification", 0),
        retries=store.count_events(EventKind.FAILED, job_ids),
        seconds=round(seconds, 2),
        audit_clean=audit.clean,
        drift=[d.as_json() for d in audit.drift],
        database=engine.url.render_as_string(hide_password=True),
        broker=settings.broker_kind,
        logs=str(log_dir),
    )


def _start_services(
    settings: Settings, options: DemoOptions, log_dir: Path, started: list[processes.ManagedProcess]
) -> None:
    port = urlsplit(settings.provider_url).port or 80
    if not processes.port_is_free(port):
        raise ProcessFailed(
            f"port {port} is taken: stop what listens there or set PROVIDER_URL to a free port"
        )
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
    env = child_environment({})
    sandbox_db = (settings.data_dir / "sandbox.sqlite3").resolve()
    sandbox = processes.start(
        "sandbox",
        processes.sandbox_argv(port, db_path=sandbox_db, options=faults),
        env=env,
        log_dir=log_dir,
    )
    started.append(sandbox)
    processes.wait_until_answers(f"{settings.provider_url}/healthz", process=sandbox)
    for number in range(options.workers):
        argv = processes.worker_argv(f"demo{number}", concurrency=options.concurrency)
        started.append(processes.start(f"worker{number}", argv, env=env, log_dir=log_dir))


def _wait(
    store: JobStore, prefix: str, total: int, timeout: float, progress: Progress
) -> dict[JobState, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = store.count_by_state(event_prefix=prefix)
        finished = sum(
            counts[state]
            for state in (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)
        )
        progress(finished, total)
        if finished >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def _audit(settings: Settings, store: JobStore, prefix: str) -> AuditReport:
    steps = effect_steps([order_placed])  # type: ignore[list-item]
    jobs = store.jobs_with_event_prefix(prefix)
    keys = frozenset(job.step_keys[step] for job in jobs for (_, step) in steps)
    entries = store.entries_of_steps(list(steps), keys=sorted(keys))
    scope = Scope(keys=keys, order_prefix=prefix)
    effects = [
        effect for effect in fetch_effects(settings.provider_url) if scope.covers_effect(effect)
    ]
    kinds = {entry.key: steps[(pipeline, entry.step)] for pipeline, entry in entries}
    return reconcile([entry for _, entry in entries], kinds, effects)
