"""One measured row of `oncelery bench`: fresh worker processes (and a sandbox) started for it,
a warm-up, N orders sent as fast as one producer can while the workers consume, L sequential
orders for idle latency, then every process stopped."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kombu import Connection, Queue

from config import MAIN_QUEUE, RETRY_QUEUE, Settings, child_environment
from jobs.orders import order_placed
from jobs.pipelines import Pipeline
from jobs.tools import processes
from jobs.tools.bench import BenchFailed, bare, figures
from jobs.tools.bench.drivers import BareDriver, Batch, Driver, LedgerDriver
from jobs.tools.bench.pipeline import bench_order_placed
from jobs.tools.databases import StatementCounter, empty_ledger
from jobs.worker import CeleryDispatch, client_app
from ledger import JobStore

#: Where `jobs` is imported from, for the workers' PYTHONPATH.
_SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]
#: Seconds between two looks while a batch is consumed.
_WAIT_INTERVAL: Final = 0.05
#: Seconds to wait for another worker to leave the bench's queues.
_FOREIGN_CONSUMER_WAIT: Final = 60.0
#: The worker every row runs: one prefork process with two children.
CONCURRENCY: Final = 2
#: Variables of the shell the bench's processes must not inherit: the bench sets its own.
_NOT_INHERITED: Final = frozenset(
    {"DATABASE_URL", "BROKER_URL", "PROVIDER_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
)


class RowKind(enum.StrEnum):
    """What a row measures."""

    #: A bare Celery chain of three no-op tasks.
    BASELINE = "baseline"
    #: The full protocol, each step its own task message (null provider).
    CHAINED = "chained"
    #: The fast path: one message per order, every step still claimed and recorded.
    FAST = "fast"
    #: The fast path with the real order-placed pipeline against `oncelery sandbox`.
    SANDBOX = "sandbox"


@dataclass(frozen=True)
class Broker:
    """A broker a row runs on."""

    kind: str
    url: str


@dataclass
class Bench:
    """What every row of one bench shares."""

    bench_url: str
    store: JobStore
    counter: StatementCounter
    work_dir: Path
    run_id: str
    orders: int
    warmup: int
    latency_orders: int

    @property
    def log_dir(self) -> Path:
        """Where the workers' and sandboxes' logs go."""
        return self.work_dir / "logs"


@dataclass(frozen=True)
class RowRun:
    """The figures of one row in one round."""

    kind: RowKind
    broker: str
    round: int
    orders_per_s: float
    enqueue_per_s: float
    cpu_ms_per_order: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    statements_per_order: float | None
    peak_rss_mib: float | None


@dataclass
class _Row:
    """A row being run: its driver, its processes, what to close after it."""

    name: str
    folder: Path
    driver: Driver | None = None
    env: dict[str, str] = field(default_factory=dict)
    started: list[processes.ManagedProcess] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)


def run_row(bench: Bench, kind: RowKind, broker: Broker, number: int) -> RowRun:
    """Run one row in fresh processes and return its figures."""
    row = _Row(f"{number}-{broker.kind}-{kind}", bench.work_dir / f"{number}-{broker.kind}-{kind}")
    row.folder.mkdir(parents=True, exist_ok=True)
    empty_ledger(bench.store.engine)
    queues = [bare.BARE_QUEUE] if kind is RowKind.BASELINE else [MAIN_QUEUE, RETRY_QUEUE]
    clear_queues(broker.url, queues)
    try:
        driver = _prepare(bench, kind, broker, row)
        worker = processes.start(
            f"{row.name}-worker", _worker_argv(kind, row.name), env=row.env, log_dir=bench.log_dir
        )
        row.started.append(worker)
        return _measure(bench, row, driver, worker, (kind, broker.kind, number))
    finally:
        processes.stop_all(row.started)
        for close in row.closers:
            close()


def _prepare(bench: Bench, kind: RowKind, broker: Broker, row: _Row) -> Driver:
    """The row's driver and its workers' environment (and its sandbox, started)."""
    if kind is RowKind.BASELINE:
        sender = bare.client(broker.url)
        row.closers.append(sender.close)
        row.env = {**inherited_environment(), "CELERY_BROKER_URL": broker.url}
        row.driver = BareDriver(sender, row.folder)
        return row.driver
    values: dict[str, object] = {
        "database_url_raw": bench.bench_url,
        "broker_url_raw": broker.url,
        "fast_path": kind is not RowKind.CHAINED,
        "task_events": False,
        "pipelines": ("jobs.tools.bench.pipeline",),
        "data_dir": bench.work_dir / "data",
    }
    if kind is RowKind.SANDBOX:
        values["provider_url"] = _start_sandbox(bench, row)
    settings = Settings.model_validate(values)
    sender = client_app(settings)
    row.closers.append(sender.close)
    pipeline: Pipeline[object] = (
        order_placed if kind is RowKind.SANDBOX else bench_order_placed  # type: ignore[assignment]
    )
    dispatch = CeleryDispatch(sender=sender, settings=settings)
    row.driver = LedgerDriver(bench.store, dispatch, pipeline, f"bench-{bench.run_id}-{row.name}-")
    row.closers.append(row.driver.close)
    row.env = {**inherited_environment(), **oncelery_environment(settings)}
    return row.driver


def oncelery_environment(settings: Settings) -> dict[str, str]:
    """The environment of an oncelery row's workers, from the row's settings."""
    return {
        "DATABASE_URL": settings.database_url,
        "BROKER_URL": settings.broker_url,
        "PROVIDER_URL": settings.provider_url,
        "ONCELERY_DATA_DIR": str(settings.data_dir),
        "ONCELERY_PIPELINES": ",".join(settings.pipelines),
        "ONCELERY_TASK_EVENTS": str(settings.task_events).lower(),
        "ONCELERY_FAST_PATH": str(settings.fast_path).lower(),
        "ONCELERY_BATCH_SIZE": str(settings.batch_size),
    }


def inherited_environment() -> dict[str, str]:
    """The shell's environment without oncelery's and Celery's own variables (the bench
    must not depend on them), `jobs` importable."""
    env = {
        name: value
        for name, value in child_environment({}).items()
        if not name.startswith("ONCELERY_") and name not in _NOT_INHERITED
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def _start_sandbox(bench: Bench, row: _Row) -> str:
    port = processes.free_port()
    argv = processes.sandbox_argv(port, db_path=row.folder / "sandbox.sqlite3", options=[])
    env = {**inherited_environment(), "ONCELERY_DATA_DIR": str(bench.work_dir / "data")}
    sandbox = processes.start(f"{row.name}-sandbox", argv, env=env, log_dir=bench.log_dir)
    row.started.append(sandbox)
    url = f"http://127.0.0.1:{port}"
    processes.wait_until_answers(f"{url}/healthz", process=sandbox)
    return url


def _worker_argv(kind: RowKind, name: str) -> list[str]:
    if kind is not RowKind.BASELINE:
        return processes.worker_argv(f"bench-{name}", concurrency=CONCURRENCY, loglevel="WARNING")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "jobs.tools.bench.bare",
        "worker",
        "--hostname",
        f"bench-{name}@%h",
        "--concurrency",
        str(CONCURRENCY),
        "--pool",
        "prefork",
        "--queues",
        bare.BARE_QUEUE,
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
    ]


def _measure(
    bench: Bench,
    row: _Row,
    driver: Driver,
    worker: processes.ManagedProcess,
    what: tuple[RowKind, str, int],
) -> RowRun:
    warm = driver.prepare("warm", bench.warmup)
    driver.send(warm)
    wait_for_batch(driver, warm, row.started, timeout=120.0 + warm.count * 0.1)
    batch = driver.prepare("main", bench.orders)
    cpu_before, calls_before, polls_before = (
        figures.group_cpu_seconds(worker.pid),
        bench.counter.read(),
        driver.polls,
    )
    began = time.perf_counter()
    driver.send(batch)
    sent = time.perf_counter()
    done = wait_for_batch(driver, batch, row.started, timeout=60.0 + batch.count * 0.1)
    cpu = figures.group_cpu_seconds(worker.pid) - cpu_before
    calls_after, polls = bench.counter.read(), driver.polls - polls_before
    latencies = [driver.probe(f"probe{n}") * 1000 for n in range(bench.latency_orders)]
    kind, broker, number = what
    calls = None
    if calls_after is not None and calls_before is not None:
        calls = calls_after - calls_before
    return RowRun(
        kind=kind,
        broker=broker,
        round=number,
        orders_per_s=batch.count / (done - began),
        enqueue_per_s=batch.count / max(sent - began, 1e-9),
        cpu_ms_per_order=cpu * 1000 / batch.count,
        latency_p50_ms=figures.percentile(latencies, 0.5),
        latency_p95_ms=figures.percentile(latencies, 0.95),
        statements_per_order=figures.per_order(
            calls.statements - polls if calls else None, batch.count
        ),
        peak_rss_mib=figures.group_peak_rss_mib(worker.pid),
    )


def wait_for_batch(
    driver: Driver, batch: Batch, started: Sequence[processes.ManagedProcess], *, timeout: float
) -> float:
    """Poll until every order of the batch is done; the `perf_counter` time it was seen.

    Raises:
        BenchFailed: a process died, or the orders did not finish within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        finished = driver.finished(batch)
        if finished >= batch.count:
            return time.perf_counter()
        for process in started:
            if not process.alive():
                raise BenchFailed(f"{process.name} exited; see {process.log_path}")
        if time.monotonic() > deadline:
            logs = started[-1].log_path if started else "the logs"
            raise BenchFailed(
                f"{finished} of {batch.count} orders of {batch.name} done after "
                f"{timeout:.0f}s; see {logs}"
            )
        time.sleep(_WAIT_INTERVAL)


def clear_queues(url: str, names: Sequence[str]) -> None:
    """Make sure no other worker consumes the row's queues (it would take some of its
    messages), waiting a minute for one to leave; then purge what an earlier run left.

    Raises:
        BenchFailed: another worker still consumes one of them.
    """
    deadline = time.monotonic() + _FOREIGN_CONSUMER_WAIT
    with Connection(url, connect_timeout=5) as conn:
        while busy := _consumers(conn, names):
            if time.monotonic() > deadline:
                raise BenchFailed(
                    f"another worker consumes {', '.join(busy)} on the bench's broker; "
                    "stop it (or wait for the test run that started it) and run the bench again"
                )
            time.sleep(1.0)
        for name in names:
            with contextlib.suppress(*conn.channel_errors):
                Queue(name, channel=conn.channel()).purge()


def _consumers(conn: Connection, names: Sequence[str]) -> list[str]:
    busy = []
    for name in names:
        # A fresh channel each time: RabbitMQ closes the channel of a failed passive declare.
        try:
            declared = Queue(name, channel=conn.channel()).queue_declare(passive=True)
        except conn.channel_errors:
            continue
        # py-amqp and kombu's virtual transports answer (queue, message_count,
        # consumer_count); Redis always says 0 consumers.
        if int(getattr(declared, "consumer_count", 0) or 0) > 0:
            busy.append(name)
    return busy
