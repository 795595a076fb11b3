"""The harness `demo` and `chaos` share: the sandbox, workers and beat as real processes, a run
of generated orders tagged with one prefix, waiting for them, and the audit of that run."""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from config import Settings, child_environment, prepare_broker
from jobs.errors import ProcessFailed
from jobs.ops.audit import (
    AuditReport,
    Scope,
    effect_steps,
    fetch_effects,
    order_amounts,
    reconcile,
    with_fulfilment,
)
from jobs.orders import OrderItem, OrderPlaced, order_placed
from jobs.pipelines import Pipeline
from jobs.tools import processes
from ledger import JobState, JobStore, LedgerError, create_engine, upgrade

#: Called with (finished, total) while a run is waited for.
Progress = Callable[[int, int], None]
#: States a job does not leave by itself.
FINISHED = (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM's default kills us on the spot, leaving the workers and sandbox behind.
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Harness:
    """Processes started for one run, and the run's orders; `stop` ends every one of them."""

    settings: Settings
    store: JobStore
    env: dict[str, str]
    log_dir: Path
    prefix: str
    started: list[processes.ManagedProcess] = field(default_factory=list)
    workers: list[processes.ManagedProcess] = field(default_factory=list)
    #: The app the workers run (`celery -A …`) and the queues they consume, when not
    #: oncelery's own (the shop of `oncelery chaos --tasks`).
    worker_app: str = "jobs"
    worker_queues: str | None = None

    @classmethod
    def prepare(cls, settings: Settings, name: str, env: dict[str, str] | None = None) -> Harness:
        """Migrate the ledger, prepare the broker, and stop on SIGTERM like on Ctrl-C."""
        signal.signal(signal.SIGTERM, _terminate)
        engine = create_engine(settings.database_url)
        upgrade(engine)
        prepare_broker(settings)
        prefix = f"{name}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-"
        log_dir = (settings.data_dir / "logs").resolve()
        return cls(settings, JobStore(engine=engine), child_environment(env or {}), log_dir, prefix)

    def start_sandbox(self, options: list[str]) -> None:
        """The sandbox provider at `PROVIDER_URL`, its file in the data folder."""
        port = urlsplit(self.settings.provider_url).port or 80
        if not processes.port_is_free(port):
            raise ProcessFailed(
                f"port {port} is taken: stop what listens there or set PROVIDER_URL to a free port"
            )
        sandbox_db = (self.settings.data_dir / "sandbox.sqlite3").resolve()
        argv = processes.sandbox_argv(port, db_path=sandbox_db, options=options)
        sandbox = processes.start("sandbox", argv, env=self.env, log_dir=self.log_dir)
        self.started.append(sandbox)
        processes.wait_until_answers(f"{self.settings.provider_url}/healthz", process=sandbox)

    def start_worker(self, concurrency: int) -> processes.ManagedProcess:
        """One more `celery -A jobs worker` (or of the harness's `worker_app`)."""
        name = f"worker{len(self.workers)}"
        queues = {"queues": self.worker_queues} if self.worker_queues else {}
        argv = processes.worker_argv(name, concurrency=concurrency, app=self.worker_app, **queues)
        worker = processes.start(name, argv, env=self.env, log_dir=self.log_dir)
        self.started.append(worker)
        self.workers.append(worker)
        return worker

    def start_beat(self) -> None:
        """`celery -A jobs beat`, which runs the sweeper."""
        argv = processes.beat_argv(self.log_dir / "beat-schedule")
        self.started.append(processes.start("beat", argv, env=self.env, log_dir=self.log_dir))

    def stop(self) -> None:
        """Stop every process started, and close the database connections."""
        processes.stop_all(self.started)
        self.store.engine.dispose()

    def orders(
        self, count: int, *, declined_rate: float = 0.0, seed: int | None = None
    ) -> list[OrderPlaced]:
        """`count` orders whose event and order ids start with the run's prefix."""
        return generate_orders(count, self.prefix, declined_rate=declined_rate, seed=seed)

    def counts(self) -> dict[JobState, int] | None:
        """The run's jobs by state; None while the database is unreachable (a restart)."""
        try:
            return self.store.count_by_state(event_prefix=self.prefix)
        except LedgerError:
            return None

    def wait(
        self,
        total: int,
        timeout: float,
        progress: Progress,
        tick: Callable[[], None] = lambda: None,
    ) -> dict[JobState, int]:
        """Wait until the run's `total` jobs are finished (or `timeout` seconds pass), calling
        `tick` between looks; returns the last counts."""
        deadline = time.monotonic() + timeout
        last = dict.fromkeys(JobState, 0)
        while True:
            counts = self.counts()
            if counts is not None:
                last = counts
                finished = sum(counts[state] for state in FINISHED)
                progress(finished, total)
                if finished >= total:
                    return counts
            if time.monotonic() > deadline:
                return last
            tick()
            time.sleep(0.25)

    def audit(self, pipeline: Pipeline[object] | None = None) -> AuditReport:
        """Reconcile this run's ledger entries with the provider's effects for its orders (of
        order-placed, or of `pipeline`; fulfilment orders' shipping notices checked too)."""
        chosen: Pipeline[object] = pipeline or order_placed  # type: ignore[assignment]
        steps = effect_steps([chosen])
        jobs = self.store.jobs_with_event_prefix(self.prefix)
        keys = frozenset(job.step_keys[step] for job in jobs for (_, step) in steps)
        entries = self.store.entries_of_steps(list(steps), keys=sorted(keys))
        scope = Scope(keys=keys, order_prefix=self.prefix)
        effects = [e for e in fetch_effects(self.settings.provider_url) if scope.covers_effect(e)]
        kinds = {entry.key: steps[(pipeline_name, entry.step)] for pipeline_name, entry in entries}
        in_scope = [entry for _, entry in entries]
        amounts = order_amounts(in_scope, kinds, self.store)
        report = reconcile(in_scope, kinds, effects, amounts=amounts)
        return with_fulfilment(report, jobs, effects)


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
