"""`oncelery chaos --pipeline order-fulfilment`: fulfilment orders under the same fire as the
orders' chaos (faults, a worker SIGKILLed every few seconds, the broker and Postgres restarted),
half of them signalled `shipped` — some before their job waits, some twice — through the signed
route, the Python API and the CLI; then every order must have exactly one shipping notice, the
one its wait's recorded result says, and every order-placed invariant must hold."""

from __future__ import annotations

import random
import secrets
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from config import Settings
from jobs.engine.enqueue import start_jobs
from jobs.engine.runtime import Runtime
from jobs.ops.audit import Scope, fetch_effects
from jobs.orders import order_fulfilment
from jobs.orders.steps.shipping import TEMPLATES
from jobs.pipelines import Pipeline
from jobs.tools import processes
from jobs.tools.chaos import CHAOS_ENVIRONMENT, ChaosOptions, Mayhem
from jobs.tools.harness import Harness, Progress
from jobs.tools.shipping import ShippingPlan, Warehouse, cli_sender, python_sender, webhook_sender
from jobs.worker import CeleryDispatch
from ledger import DeadLetterStore, Job, JobState

#: One send in this many goes through `oncelery signal` (a process each, seconds apiece).
CLI_SHARE = 12


@dataclass(frozen=True)
class FulfilmentChaosReport:
    """The run's figures and every broken invariant."""

    broker: str
    orders: int
    completed: int
    dead_lettered: int
    stuck: int
    charges: int
    duplicate_charges: int
    confirmations: int
    shipping_notices: int
    order_shipped: int
    ship_reminders: int
    waits_by_signal: int
    waits_by_timeout: int
    signals_sent: int
    signals_duplicate: int
    signals_by_way: dict[str, int]
    kills: int
    restarts: int
    seconds: float
    violations: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def ok(self) -> bool:
        """Nothing doubled, lost, stuck or sent wrong."""
        return not self.violations and not self.stuck

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        """One line."""
        return (
            f"chaos {self.broker} order-fulfilment: orders={self.orders} "
            f"completed={self.completed} dead_lettered={self.dead_lettered} "
            f"charges={self.charges} duplicate_charges={self.duplicate_charges} "
            f"order_shipped={self.order_shipped} ship_reminders={self.ship_reminders} "
            f"waits_by_signal={self.waits_by_signal} waits_by_timeout={self.waits_by_timeout} "
            f"signals={self.signals_sent} ({self.signals_duplicate} duplicate, "
            f"{self.signals_by_way}) kills={self.kills} restarts={self.restarts} "
            f"stuck={self.stuck} violations={len(self.violations)} "
            f"seconds={self.seconds:.1f} -> {'OK' if self.ok else 'FAILED'}"
        )


def run_fulfilment_chaos(
    settings: Settings, options: ChaosOptions, reminder_after: float, progress: Progress
) -> FulfilmentChaosReport:
    """Run the scenario and check it; every process it starts is stopped before it returns."""
    secret = secrets.token_urlsafe(24)
    env = {
        **CHAOS_ENVIRONMENT,
        "ONCELERY_SHIP_REMINDER_AFTER": str(reminder_after),
        "WEBHOOK_SECRET": secret,
        "API_TOKEN": secrets.token_urlsafe(24),
    }
    harness = Harness.prepare(settings, "chaos-fulfil", env)
    mayhem = Mayhem(harness, options, random.Random(options.seed))
    pipeline: Pipeline[object] = order_fulfilment  # type: ignore[assignment]
    timeout = options.timeout or 180.0 + reminder_after + options.orders * 0.5
    stop = threading.Event()
    rt = Runtime.from_settings(settings, engine=harness.store.engine)
    try:
        harness.start_sandbox(
            [
                *("--fault-rate", str(options.fault_rate)),
                *("--timeout-rate", str(options.timeout_rate), "--hang-seconds", "2"),
            ]
        )
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        harness.start_beat()
        api = _start_api(harness)
        orders = harness.orders(options.orders, seed=options.seed)
        plan = ShippingPlan.for_orders([order.order_id for order in orders])
        webhook, python = webhook_sender(api, secret), python_sender(rt, CeleryDispatch())
        senders = [("webhook", webhook), ("python", python)] * (CLI_SHARE // 2)
        warehouse = Warehouse(plan, [*senders[:-1], ("cli", cli_sender(harness.env))], parallel=4)
        began = time.monotonic()
        mayhem.next_kill = began + options.kill_every
        warehouse.ship_early()
        new_jobs = [
            pipeline.new_job(order.event_id, order.model_dump(mode="json", exclude={"event_id"}))
            for order in orders
        ]
        start_jobs(harness.store, CeleryDispatch(), pipeline, new_jobs)
        shipping = threading.Thread(
            target=warehouse.ship_until_done, args=(harness.store, harness.prefix, stop)
        )
        shipping.start()
        shares = {"finished": 0.0}

        def watch(done: int, total: int) -> None:
            # The unshipped half ends only at its reminder, all within seconds on a busy box:
            # by the clock too, or that burst ended the run before the Postgres restart.
            clock = (time.monotonic() - began) / (2 * reminder_after)
            shares["finished"] = max(done / max(total, 1), min(clock, 1.0))
            progress(done, total)

        harness.wait(len(orders), timeout, watch, lambda: mayhem.tick(shares["finished"]))
        seconds = time.monotonic() - began
        stop.set()
        shipping.join(timeout=300)
        time.sleep(2.0)  # let a killed worker's orphans finish what they were doing
        return _report(harness, options, mayhem, warehouse, seconds)
    finally:
        stop.set()
        harness.stop()


def _start_api(harness: Harness) -> str:
    """`oncelery api` for the signed route; its base URL."""
    port = processes.free_port()
    argv = [sys.executable, "-m", "jobs", "api", "--port", str(port)]
    api = processes.start("api", argv, env=harness.env, log_dir=harness.log_dir)
    harness.started.append(api)
    base = f"http://127.0.0.1:{port}"
    processes.wait_until_answers(f"{base}/healthz", process=api, timeout=60)
    return base


def _report(
    harness: Harness,
    options: ChaosOptions,
    mayhem: Mayhem,
    warehouse: Warehouse,
    seconds: float,
) -> FulfilmentChaosReport:
    jobs = harness.store.jobs_with_event_prefix(harness.prefix)
    scope = Scope(order_prefix=harness.prefix)
    effects = [e for e in fetch_effects(harness.settings.provider_url) if scope.covers_effect(e)]
    letters = {letter.job_id for letter in DeadLetterStore(engine=harness.store.engine).list()}
    pipeline: Pipeline[object] = order_fulfilment  # type: ignore[assignment]
    audit = harness.audit(pipeline)
    per_order: Counter[tuple[str, str]] = Counter(
        (str(e.order_id), e.kind if e.kind == "charge" else str(e.template)) for e in effects
    )
    violations = [
        f"audit: {d.problem} {d.kind} key={d.key} order={d.order_id} {d.detail}"
        for d in audit.drift
    ]
    violations += [f"signal not sent: {failure}" for failure in warehouse.failures]
    for job in jobs:
        violations += _order_violations(job, per_order, job.id in letters)
    fulfilment = audit.fulfilment or {}
    states = Counter(job.state for job in jobs)
    notices = [e for e in effects if e.template in TEMPLATES.values()]
    return FulfilmentChaosReport(
        broker=harness.settings.broker_kind,
        orders=options.orders,
        completed=states[JobState.SUCCEEDED],
        dead_lettered=states[JobState.DEAD_LETTERED],
        stuck=states[JobState.PENDING] + states[JobState.RUNNING] + options.orders - len(jobs),
        charges=sum(1 for e in effects if e.kind == "charge"),
        duplicate_charges=audit.duplicates.get("charge", 0),
        confirmations=sum(1 for e in effects if e.template == "order_confirmed"),
        shipping_notices=len(notices),
        order_shipped=sum(1 for e in notices if e.template == "order_shipped"),
        ship_reminders=sum(1 for e in notices if e.template == "ship_reminder"),
        waits_by_signal=int(str(fulfilment.get("signalled", 0))),
        waits_by_timeout=int(str(fulfilment.get("timed_out", 0))),
        signals_sent=sum(warehouse.answers.values()),
        signals_duplicate=warehouse.answers["duplicate"],
        signals_by_way=dict(warehouse.ways),
        kills=mayhem.kills,
        restarts=len(mayhem.restarts),
        seconds=round(seconds, 1),
        violations=violations,
        logs=str(harness.log_dir),
    )


def _order_violations(job: Job, per_order: Counter[tuple[str, str]], lettered: bool) -> list[str]:
    """A succeeded order has one charge, one confirmation and one shipping notice; a
    dead-lettered one at most one of each, and a dead letter; no order is left unfinished."""
    order = str(job.context.get("order_id"))
    counts = {
        "charge": per_order[(order, "charge")],
        "order_confirmed": per_order[(order, "order_confirmed")],
        "shipping notice": sum(per_order[(order, t)] for t in TEMPLATES.values()),
    }
    if job.state is JobState.SUCCEEDED:
        return [f"order {order} succeeded with {n} {what}" for what, n in counts.items() if n != 1]
    if job.state is JobState.DEAD_LETTERED:
        wrong = [f"order {order} dead-lettered with {n} {w}" for w, n in counts.items() if n > 1]
        return wrong + ([] if lettered else [f"job {job.id} is dead-lettered without a letter"])
    return [f"order {order} is {job.state} (stuck)"]
