"""`oncelery chaos --tasks`: chains of a user's decorated Celery tasks (`jobs.tools.shop`:
reserve → charge → notify) under fire — workers SIGKILLed, the broker restarted — then every
call's effect counted at the provider, and the run's keys audited."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from celery import chain

from config import Settings
from jobs.ops.audit import AuditReport, Scope, fetch_effects, reconcile
from jobs.sandbox import unit_amount
from jobs.tasks import PIPELINE_PREFIX, STEP
from jobs.tools import shop
from jobs.tools.chaos import CHAOS_ENVIRONMENT, ChaosOptions, Mayhem
from jobs.tools.harness import Harness, Progress
from ledger import EventKind, Job, JobState

#: The shop's tasks, in chain order, and the effect each applies.
TASKS = ("reserve", "charge", "notify")
EFFECTS = {"charge": "charge", "notify": "notification"}
#: Call states a run does not leave by itself.
_ENDED = (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)


@dataclass(frozen=True)
class Order:
    """One chain's input: the order and what it buys."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int

    @property
    def amount(self) -> int:
        """What its charge must amount to, at the sandbox's prices."""
        return unit_amount(self.sku) * self.quantity


@dataclass(frozen=True)
class TaskChaosReport:
    """The run's figures, counted at the provider, and every broken invariant."""

    broker: str
    chains: int
    completed: int
    dead_lettered: int
    charges: int
    duplicate_charges: int
    notifications: int
    duplicate_notifications: int
    #: Chains that ended silently: not completed, not dead-lettered, nothing unfinished.
    lost: int
    #: Calls still pending or running at the end.
    stuck: int
    #: Calls the sweeper re-sent (from their kept messages).
    resent: int
    kills: int
    restarts: int
    seconds: float
    violations: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def ok(self) -> bool:
        """No duplicate, nothing lost, nothing stuck."""
        return not self.violations and not self.lost and not self.stuck

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        """One line."""
        return (
            f"chaos --tasks {self.broker}: chains={self.chains} completed={self.completed} "
            f"dead_lettered={self.dead_lettered} charges={self.charges} "
            f"duplicate_charges={self.duplicate_charges} notifications={self.notifications} "
            f"duplicate_notifications={self.duplicate_notifications} lost={self.lost} "
            f"stuck={self.stuck} resent={self.resent} kills={self.kills} "
            f"restarts={self.restarts} violations={len(self.violations)} "
            f"seconds={self.seconds:.1f} -> {'OK' if self.ok else 'FAILED'}"
        )


def run_task_chaos(
    settings: Settings, options: ChaosOptions, progress: Progress
) -> TaskChaosReport:
    """Send `options.orders` chains of the shop's decorated tasks through its own app while
    workers of that app are SIGKILLed every few seconds (the broker restarted once, if asked),
    wait for every chain to end, and check it at the provider; every process it starts is
    stopped before it returns."""
    harness = Harness.prepare(settings, "tasks", CHAOS_ENVIRONMENT)
    harness.worker_app, harness.worker_queues = shop.__name__, shop.QUEUE
    # Postgres restarts are the orders' chaos; here the broker's.
    mayhem = Mayhem(harness, _no_db_restart(options), random.Random(options.seed))
    timeout = options.timeout or 180.0 + options.orders * 0.5
    try:
        harness.start_sandbox(
            [
                *("--fault-rate", str(options.fault_rate)),
                *("--timeout-rate", str(options.timeout_rate)),
                *("--hang-seconds", "2"),
            ]
        )
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        orders = _orders(harness.prefix, options.orders, options.seed)
        began = time.monotonic()
        mayhem.next_kill = began + options.kill_every
        for order in orders:
            chain(
                shop.reserve.s(order.order_id, order.customer_id, order.sku, order.quantity),
                shop.charge.s(),
                shop.notify.s(),
            ).apply_async()
        deadline = began + timeout
        while True:
            ended = _ended_chains(harness)
            progress(ended, len(orders))
            if ended >= len(orders) or time.monotonic() > deadline:
                break
            mayhem.tick(ended / len(orders))
            time.sleep(0.5)
        seconds = time.monotonic() - began
        time.sleep(2.0)  # let a killed worker's orphans finish what they were doing
        return _report(harness, orders, mayhem, seconds)
    finally:
        harness.stop()


def _no_db_restart(options: ChaosOptions) -> ChaosOptions:
    return ChaosOptions(**{**asdict(options), "db_restart": False})


def _orders(prefix: str, count: int, seed: int | None) -> list[Order]:
    rng = random.Random(seed)
    return [
        Order(f"{prefix}{n}", f"cust-{n % 50}", f"SKU-{rng.randrange(1, 40)}", rng.randrange(1, 4))
        for n in range(count)
    ]


def _calls(harness: Harness, task: str) -> list[Job]:
    """The run's calls of one of the shop's tasks (their event ids start with their key)."""
    return harness.store.jobs_with_event_prefix(f"{task}:{harness.prefix}")


def _ended_chains(harness: Harness) -> int:
    """Chains that completed (their notify succeeded) or stopped at a dead letter."""
    try:
        counts = {
            task: harness.store.count_by_state(event_prefix=f"{task}:{harness.prefix}")
            for task in TASKS
        }
    except Exception:  # noqa: BLE001 - the database may be restarting: ask again later
        return 0
    stopped = sum(counts[task][JobState.DEAD_LETTERED] for task in TASKS)
    return counts["notify"][JobState.SUCCEEDED] + stopped


def _report(
    harness: Harness, orders: list[Order], mayhem: Mayhem, seconds: float
) -> TaskChaosReport:
    calls = {task: _calls(harness, task) for task in TASKS}
    by_order = {task: {_order_of(job): job for job in jobs} for task, jobs in calls.items()}
    audit = _audit(harness, orders, calls)
    effects = [
        effect
        for effect in fetch_effects(harness.settings.provider_url)
        if (effect.order_id or "").startswith(harness.prefix)
    ]
    charged = Counter(e.order_id for e in effects if e.kind == "charge")
    notified = Counter(e.order_id for e in effects if e.kind == "notification")
    violations = [
        f"audit: {d.problem} {d.kind} key={d.key} order={d.order_id}" for d in audit.drift
    ]
    completed = dead = lost = 0
    for order in orders:
        states = [by_order[task].get(order.order_id) for task in TASKS]
        effects_of = f"{charged[order.order_id]} charges, {notified[order.order_id]} notifications"
        counted = (charged[order.order_id], notified[order.order_id])
        if states[2] is not None and states[2].state is JobState.SUCCEEDED:
            completed += 1
            if counted != (1, 1):
                violations.append(f"chain {order.order_id} completed with {effects_of}")
        elif any(job is not None and job.state is JobState.DEAD_LETTERED for job in states):
            dead += 1
            if max(counted) > 1:
                violations.append(f"chain {order.order_id} dead-lettered with {effects_of}")
        elif all(job is None or job.state in _ENDED for job in states):
            lost += 1
            violations.append(f"chain {order.order_id} ended silently: {_states(states)}")
    unfinished = [job for jobs in calls.values() for job in jobs if job.state not in _ENDED]
    violations.extend(f"call {job.event_id} is {job.state} (stuck)" for job in unfinished)
    resent = sum(
        1
        for jobs in calls.values()
        for job in jobs
        for event in harness.store.history(job.id).events
        if event.kind is EventKind.REDRIVEN
    )
    return TaskChaosReport(
        broker=harness.settings.broker_kind,
        chains=len(orders),
        completed=completed,
        dead_lettered=dead,
        charges=sum(charged.values()),
        duplicate_charges=sum(max(0, n - 1) for n in charged.values()),
        notifications=sum(notified.values()),
        duplicate_notifications=sum(max(0, n - 1) for n in notified.values()),
        lost=lost,
        stuck=len(unfinished),
        resent=resent,
        kills=mayhem.kills,
        restarts=len(mayhem.restarts),
        seconds=round(seconds, 1),
        violations=violations,
        logs=str(harness.log_dir),
    )


def _order_of(job: Job) -> str:
    # A call's key is "<task>:<order id>" (see `jobs.tools.shop`).
    return str(job.context.get("key", "")).partition(":")[2]


def _states(states: list[Job | None]) -> str:
    return ", ".join(
        f"{task} {job.state if job is not None else 'never seen'}"
        for task, job in zip(TASKS, states, strict=True)
    )


def _audit(harness: Harness, orders: list[Order], calls: dict[str, list[Job]]) -> AuditReport:
    """The run's effect keys reconciled with the provider's effects for its orders, each
    charge's amount checked against the order's price."""
    kinds = {job.step_keys[STEP]: EFFECTS[task] for task in EFFECTS for job in calls[task]}
    steps = [(PIPELINE_PREFIX + getattr(shop, task).name, STEP) for task in EFFECTS]
    entries = [entry for _, entry in harness.store.entries_of_steps(steps, keys=sorted(kinds))]
    scope = Scope(keys=frozenset(kinds), order_prefix=harness.prefix)
    effects = [e for e in fetch_effects(harness.settings.provider_url) if scope.covers_effect(e)]
    amounts = {f"charge:{order.order_id}": order.amount for order in orders}
    return reconcile(entries, kinds, effects, amounts=amounts)
