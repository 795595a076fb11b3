"""`oncelery chaos`: the order-placed pipeline under fire (faults, kills, restarts), then the five
invariants checked at the provider, and how fast the jobs each fault interrupted moved again."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from config import Settings
from jobs.ops.audit import Scope, fetch_effects
from jobs.orders import enqueue_orders
from jobs.tools import processes
from jobs.tools.harness import Harness, Progress
from jobs.tools.invariants import check_invariants
from jobs.tools.recovery import BROKER, DATABASE, KILL, Fault, Recovery, observe, recoveries
from jobs.worker import CeleryDispatch
from ledger import DeadLetterStore

#: What the processes of a chaos run are told: short leases and sweeps, so that what a kill
#: leaves behind is found in seconds rather than minutes.
CHAOS_ENVIRONMENT = {
    # Renewed every second while a step acts: a killed worker's keys come free in 3 s.
    "ONCELERY_STEP_LEASE": "3",
    "ONCELERY_STEP_TIME_LIMIT": "3",
    "ONCELERY_PROVIDER_TIMEOUT": "1",
    "ONCELERY_SWEEP_INTERVAL": "2",
    "ONCELERY_SWEEP_STALLED_AFTER": "8",
    "ONCELERY_RETRY_BACKOFF_BASE": "0.1",
    "ONCELERY_RETRY_BACKOFF_MAX": "2",
    "ONCELERY_RETRY_MAX_ATTEMPTS": "10",
}


@dataclass(frozen=True)
class ChaosOptions:
    """What the chaos run does."""

    orders: int = 500
    kill_every: float = 3.0
    broker_restart: bool = False
    db_restart: bool = False
    workers: int = 2
    concurrency: int = 2
    fault_rate: float = 0.10
    timeout_rate: float = 0.05
    timeout: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class ChaosReport:
    """The run's figures and every broken invariant."""

    broker: str
    orders: int
    completed: int
    dead_lettered: int
    charges: int
    duplicate_charges: int
    notifications: int
    duplicate_notifications: int
    kills: int
    restarts: int
    stuck: int
    seconds: float
    violations: list[str] = field(default_factory=list)
    logs: str = ""
    #: By fault kind (kill, broker, database): seconds to the interrupted jobs' next progress.
    recovery: dict[str, Recovery] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No duplicate, nothing lost, nothing stuck."""
        return not self.violations and not self.stuck

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        recovery = {kind: each.as_json() for kind, each in self.recovery.items()}
        return {**asdict(self), "recovery": recovery, "ok": self.ok}

    def summary(self) -> str:
        """One line."""
        recovered = " ".join(f"{kind}={each.summary()}" for kind, each in self.recovery.items())
        return (
            f"chaos {self.broker}: orders={self.orders} completed={self.completed} "
            f"dead_lettered={self.dead_lettered} charges={self.charges} "
            f"duplicate_charges={self.duplicate_charges} notifications={self.notifications} "
            f"duplicate_notifications={self.duplicate_notifications} kills={self.kills} "
            f"restarts={self.restarts} stuck={self.stuck} violations={len(self.violations)} "
            f"seconds={self.seconds:.1f} recovery_p50/p99: {recovered} "
            f"-> {'OK' if self.ok else 'FAILED'}"
        )


@dataclass
class Mayhem:
    """The kills and restarts of one run."""

    harness: Harness
    options: ChaosOptions
    rng: random.Random
    kills: int = 0
    restarts: list[str] = field(default_factory=list)
    next_kill: float = 0.0
    orphans: list[tuple[int, float]] = field(default_factory=list)
    #: What the ledger showed just before each kill and restart (when it answered).
    faults: list[Fault] = field(default_factory=list)

    def tick(self, finished_share: float) -> None:
        now = time.monotonic()
        self._reap(now)
        # On the clock, and at least once per fifth of the run: a run that goes faster than
        # the clock (a quiet machine) is still killed in its middle, not only at its start.
        behind = self.kills < int(finished_share * 5)
        if now >= self.next_kill or behind:
            self._kill_one()
            self.next_kill = now + self.options.kill_every * self.rng.uniform(0.5, 1.5)
        if self.options.broker_restart and "broker" not in self.restarts and finished_share >= 0.25:
            self.restarts.append("broker")
            self._observe(BROKER)
            _run(broker_restart_command(self.harness.settings))
        if self.options.db_restart and "database" not in self.restarts and finished_share >= 0.5:
            self.restarts.append("database")
            self._observe(DATABASE)
            _run(database_restart_command(self.harness.settings))

    def _kill_one(self) -> None:
        alive = [w for w in self.harness.workers if w.alive()]
        if not alive:
            self.harness.start_worker(self.options.concurrency)
            return
        # Only a worker whose pool is up can hold a job: on a loaded machine a worker takes
        # longer to boot than the time between kills, and killing it then only stops every
        # worker from ever working (runs ended with 100+ workers started and most orders stuck).
        working = [w for w in alive if _children(w.pid)]
        if not working:
            return
        victim = self.rng.choice(working)
        children = _children(victim.pid)
        self._observe(KILL)
        if children and self.rng.random() < 0.5:
            # A pool child dies; its worker forks a new one and rejects the child's message.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(children), signal.SIGKILL)
        else:
            # The main process dies; its children go on a moment, orphaned, like zombies.
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)
            self.orphans.append((victim.pid, time.monotonic() + 2.0))
            self.harness.start_worker(self.options.concurrency)
        self.kills += 1

    def _observe(self, kind: str) -> None:
        fault = observe(self.harness.store, self.harness.prefix, kind)
        if fault is not None:
            self.faults.append(fault)

    def _reap(self, now: float) -> None:
        for pgid, when in list(self.orphans):
            if now >= when:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, 0)
                    # Orphans still run, maybe with claims of their own: a kill like any other.
                    self._observe(KILL)
                    os.killpg(pgid, signal.SIGKILL)
                self.orphans.remove((pgid, when))


def run_chaos(settings: Settings, options: ChaosOptions, progress: Progress) -> ChaosReport:
    """Run the chaos scenario — injected 5xx and timeouts, a worker SIGKILLed every few seconds
    (its main process or a child) and replaced, the broker and the database restarted mid-run —
    and check it (recovery times by `jobs.tools.recovery`); every process it starts is stopped
    before it returns."""
    harness = Harness.prepare(settings, "chaos", CHAOS_ENVIRONMENT)
    mayhem = Mayhem(harness, options, random.Random(options.seed))
    timeout = options.timeout or 180.0 + options.orders * 0.3
    try:
        harness.start_sandbox(
            [
                "--fault-rate",
                str(options.fault_rate),
                "--timeout-rate",
                str(options.timeout_rate),
                "--hang-seconds",
                "2",
            ]
        )
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        harness.start_beat()
        orders = harness.orders(options.orders, seed=options.seed)
        began = time.monotonic()
        mayhem.next_kill = began + options.kill_every
        enqueue_orders(harness.store, CeleryDispatch(), orders)
        shares = {"finished": 0.0}

        def watch(done: int, total: int) -> None:
            shares["finished"] = done / max(total, 1)
            progress(done, total)

        harness.wait(len(orders), timeout, watch, lambda: mayhem.tick(shares["finished"]))
        seconds = time.monotonic() - began
        time.sleep(2.0)  # let a killed worker's orphans finish what they were doing
        return _report(harness, options, mayhem, seconds)
    finally:
        harness.stop()


def _report(harness: Harness, options: ChaosOptions, mayhem: Mayhem, seconds: float) -> ChaosReport:
    jobs = harness.store.jobs_with_event_prefix(harness.prefix)
    scope = Scope(order_prefix=harness.prefix)
    effects = [e for e in fetch_effects(harness.settings.provider_url) if scope.covers_effect(e)]
    letters = DeadLetterStore(engine=harness.store.engine).list(state=None)
    report = check_invariants(jobs, effects, letters, harness.audit())
    events = harness.store.events_with_event_prefix(harness.prefix)
    ended = max([datetime.now(UTC), *(event.at for event in events)])
    recovery = recoveries(mayhem.faults, events, ended)
    return ChaosReport(
        broker=harness.settings.broker_kind,
        orders=options.orders,
        completed=report.completed,
        dead_lettered=report.dead_lettered,
        charges=report.charges,
        duplicate_charges=report.duplicate_charges,
        notifications=report.notifications,
        duplicate_notifications=report.duplicate_notifications,
        kills=mayhem.kills,
        restarts=len(mayhem.restarts),
        stuck=report.stuck + (options.orders - len(jobs)),
        seconds=round(seconds, 1),
        violations=report.violations,
        logs=str(harness.log_dir),
        recovery=recovery,
    )


def broker_restart_command(settings: Settings) -> str:
    """How to restart the broker: `ONCELERY_CHAOS_BROKER_RESTART`, or the local server's own."""
    if settings.chaos_broker_restart:
        return settings.chaos_broker_restart
    if settings.broker_kind == "amqp":
        return "rabbitmqctl -q stop_app && rabbitmqctl -q start_app"
    if settings.broker_kind == "redis":
        url = urlsplit(settings.broker_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        # Without persistence, a restarted Redis has forgotten every queue: the sweeper's job.
        return (
            f"redis-cli -h {host} -p {port} shutdown nosave; sleep 0.5; "
            f"redis-server --daemonize yes --bind {host} --port {port} --save '' --appendonly no"
        )
    return "true"


def database_restart_command(settings: Settings) -> str:
    """How to restart Postgres: `ONCELERY_CHAOS_DATABASE_RESTART`, or the local cluster's
    `pg_ctlcluster … restart` (found by port with `pg_lsclusters`)."""
    if settings.chaos_database_restart:
        return settings.chaos_database_restart
    if settings.embedded_database:
        return "true"
    port = urlsplit(settings.database_url.replace("+psycopg", "")).port or 5432
    return (
        f"pg_ctlcluster --skip-systemctl-redirect $(pg_lsclusters -h | "
        f"awk '$3 == {port} {{print $1, $2; exit}}') restart"
    )


def _run(command: str) -> None:
    # The command comes from the settings (or the defaults above), never from a request.
    subprocess.run(["/bin/bash", "-c", command], check=False, timeout=120, capture_output=True)  # noqa: S603


def _children(pid: int) -> list[int]:
    return [child for child, (parent, _) in processes.process_table().items() if parent == pid]
