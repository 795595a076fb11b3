"""`oncelery bench`: bare Celery against oncelery, side by side, on this machine's Postgres and
brokers, in a database of its own (`<name>_bench`), never in the user's ledger. With
`--intake`, the signed webhook of a real `oncelery api` under concurrent load instead."""

from __future__ import annotations

import os
import platform
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from rich.console import Console
from rich.rule import Rule

from config import Settings
from jobs.tools import databases
from jobs.tools.bench.intake import IntakeOptions, IntakeRun, run_intake_bench
from jobs.tools.bench.map_rows import MapReport, MapRowKind, map_notes, run_map_row
from jobs.tools.bench.report import (
    RowSummary,
    Target,
    check_targets,
    queries_table,
    rows_table,
    summarize,
    targets_table,
)
from jobs.tools.bench.rows import CONCURRENCY, Bench, Broker, RowKind, RowRun, run_row
from jobs.tools.bench.seed import QueryTiming, seed_history, time_queries
from jobs.tools.bench.timers import TimerOptions, TimerReport, run_timer_bench
from ledger import JobStore

#: Which broker URL schemes each `--broker` accepts.
_SCHEMES = {"amqp": ("amqp://", "pyamqp://"), "redis": ("redis://", "rediss://")}


@dataclass(frozen=True)
class BenchOptions:
    """What one bench measures."""

    brokers: tuple[Broker, ...]
    orders: int = 2000
    runs: int = 3
    latency_orders: int = 100
    seed_jobs: int = 0
    warmup: int = 100


@dataclass
class BenchReport:
    """Everything a bench found."""

    options: BenchOptions
    rows: list[RowSummary]
    queries: list[QueryTiming] = field(default_factory=list)
    seed_seconds: float | None = None
    environment: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[Target]:
        """The issue's targets and whether they were met."""
        return check_targets(self.rows, self.queries)

    def as_json(self) -> dict[str, object]:
        """For `--json`: one object."""
        options = self.options
        return {
            "brokers": [broker.kind for broker in options.brokers],
            "orders": options.orders,
            "runs": options.runs,
            "latency_orders": options.latency_orders,
            "warmup_orders": options.warmup,
            "rows": [row.as_json() for row in self.rows],
            "queries": self._queries_json(),
            "targets": [vars(target) for target in self.targets],
            "environment": {**self.environment, "notes": self.notes},
        }

    def _queries_json(self) -> dict[str, object] | None:
        if not self.options.seed_jobs:
            return None
        return {
            "seeded_jobs": self.options.seed_jobs,
            "seed_seconds": round(self.seed_seconds or 0.0, 1),
            "timings": [
                {
                    "name": q.name,
                    "median_ms": round(q.median_ms, 3),
                    "runs_ms": [round(ms, 3) for ms in q.runs_ms],
                    "found": q.found,
                    "meets_target": q.meets_target,
                    "statements": [vars(statement) for statement in q.statements],
                }
                for q in self.queries
            ],
        }

    def print(self, console: Console) -> None:
        """The tables, the plans, the targets and the notes, for people."""
        if self.rows:
            title = (
                f"oncelery bench: {self.options.orders} orders, median of {self.options.runs} "
                f"run(s), prefork concurrency {CONCURRENCY}"
            )
            console.print(rows_table(self.rows, title))
        if self.queries:
            console.print(queries_table(self.queries, self.options.seed_jobs))
            for query in self.queries:
                for statement in query.statements:
                    console.print(Rule(f"{query.name}: {statement.sql[:80]}"))
                    console.print("\n".join(statement.plan), markup=False, highlight=False)
        console.print(targets_table(self.targets))
        for note in self.notes:
            console.print(f"note: {note}", markup=False, highlight=False)


def brokers_for(choice: str, *, amqp_url: str, redis_url: str) -> tuple[Broker, ...]:
    """The brokers `--broker` names, with their URLs.

    Raises:
        ValueError: an unknown choice, or a URL of the wrong scheme (the message names the
            option).
    """
    urls = {"amqp": amqp_url, "redis": redis_url}
    if choice not in ("amqp", "redis", "all"):
        raise ValueError(f"--broker: expected amqp, redis or all, got {choice!r}")
    kinds = ("amqp", "redis") if choice == "all" else (choice,)
    for kind in kinds:
        if not urls[kind].startswith(_SCHEMES[kind]):
            raise ValueError(f"--{kind}-url: expected a {kind}:// URL")
    return tuple(Broker(kind, urls[kind]) for kind in kinds)


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM's default would leave the bench's workers and sandboxes behind.
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(settings: Settings, options: BenchOptions, log: Callable[[str], None]) -> BenchReport:
    """Run the rows — the baseline chain, the chained protocol, the fast path and the fast path
    against the sandbox — interleaved round by round in fresh workers, and, with `--seed-jobs`,
    time the sweeper's and `status`'s queries over a large finished history; every process the
    bench starts is stopped before it returns.

    Raises:
        BenchFailed: the bench database could not be prepared, or a row could not be measured.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    bench = _open_bench(settings, options, log)
    engine, counter = bench.store.engine, bench.counter
    report = BenchReport(options, [])
    try:
        report.rows = summarize(_rounds(bench, options, log))
        if options.seed_jobs:
            databases.empty_ledger(engine)
            log(f"seeding {options.seed_jobs:,} finished jobs")
            report.seed_seconds = seed_history(engine, options.seed_jobs, log)
            log(f"seeded in {report.seed_seconds:.0f}s; timing the queries")
            report.queries = time_queries(
                engine, stalled_after=settings.stalled_after, relay_after=settings.relay_after
            )
    finally:
        # The seeded history is gigabytes: leave the bench database empty.
        databases.empty_ledger(engine)
        counter.close()
        engine.dispose()
    report.environment = _environment(bench, databases.server_version_of(bench.bench_url))
    report.notes = notes(options, counter.unavailable)
    return report


def _open_bench(settings: Settings, options: BenchOptions, log: Callable[[str], None]) -> Bench:
    """The bench database prepared, its statement counter, and this run's folder."""
    bench_url = databases.bench_database_url(settings.database_url)
    engine = databases.prepare_bench_database(bench_url)
    counter = databases.StatementCounter(bench_url)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    work_dir = (settings.data_dir / "bench" / run_id).resolve()
    bench = Bench(
        bench_url, JobStore(engine=engine), counter, work_dir, run_id, options.orders,
        options.warmup, options.latency_orders,
    )  # fmt: skip
    log(f"bench database {databases.database_name(bench_url)}; logs in {bench.log_dir}")
    return bench


def run_map_bench(
    settings: Settings, options: BenchOptions, backend_url: str, log: Callable[[str], None]
) -> MapReport:
    """`oncelery bench --map N`: a map of `options.orders` items against a chord of as many,
    interleaved round by round and broker by broker, in fresh workers.

    Raises:
        BenchFailed: the bench database could not be prepared, or a row could not be measured.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    bench = _open_bench(settings, options, log)
    runs = []
    try:
        for number in range(1, max(options.runs, 1) + 1):
            for broker in options.brokers:
                for kind in MapRowKind:
                    log(f"round {number}: {broker.kind} {kind} of {options.orders:,} items …")
                    run = run_map_row(
                        bench, kind, broker, number, items=options.orders, backend_url=backend_url
                    )
                    runs.append(run)
                    log(
                        f"round {number}: {broker.kind} {kind}: {run.items_per_s:.0f} items/s, "
                        f"join lag {run.join_lag_ms:.0f} ms, RSS {run.peak_rss_mib or 0:.0f} MiB"
                    )
    finally:
        databases.empty_ledger(bench.store.engine)
        bench.counter.close()
        bench.store.engine.dispose()
    return MapReport(runs, map_notes(options.orders, max(options.runs, 1)))


def run_timers(
    settings: Settings,
    brokers: tuple[Broker, ...],
    options: TimerOptions,
    log: Callable[[str], None],
) -> TimerReport:
    """`oncelery bench --timers N` (see `jobs.tools.bench.timers`).

    Raises:
        BenchFailed: the bench database could not be prepared, or a phase could not be
            measured.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    bench = _open_bench(settings, BenchOptions(brokers=brokers), log)
    try:
        return run_timer_bench(bench, brokers, options, log)
    finally:
        bench.counter.close()
        bench.store.engine.dispose()


def _rounds(bench: Bench, options: BenchOptions, log: Callable[[str], None]) -> list[RowRun]:
    runs = []
    for number in range(1, options.runs + 1):
        for broker in options.brokers:
            for kind in RowKind:
                log(f"round {number}/{options.runs}: {broker.kind} {kind} …")
                run = run_row(bench, kind, broker, number)
                runs.append(run)
                log(
                    f"round {number}/{options.runs}: {broker.kind} {kind}: "
                    f"{run.orders_per_s:.0f} orders/s, p50 {run.latency_p50_ms or 0:.2f} ms, "
                    f"{run.cpu_ms_per_order:.2f} CPU ms/order, enqueue {run.enqueue_per_s:.0f}/s"
                )
    return runs


def _environment(bench: Bench, postgres: str) -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "celery": metadata.version("celery"),
        "kombu": metadata.version("kombu"),
        "postgres": postgres,
        "bench_database": databases.database_name(bench.bench_url),
        "statements_counted": bench.counter.unavailable is None,
        "logs": str(bench.log_dir),
    }


def notes(options: BenchOptions, statements_unavailable: str | None) -> list[str]:
    """How the figures were taken, and what was chosen to keep the comparison fair."""
    found = [
        f"every row runs in fresh processes: one `celery worker` (prefork, concurrency "
        f"{CONCURRENCY}, prefetch multiplier 4, acks_late, reject on worker lost, JSON, no result "
        "backend, --loglevel WARNING, without gossip and mingle), stopped after the row; rows "
        "are interleaved round by round, and each figure is the median over the rounds",
        "task events are off in every row (ONCELERY_TASK_EVENTS=false for oncelery; the "
        "baseline sends none either)",
        "the baseline is stock Celery: no RabbitMQ publisher confirms and no per-message time "
        "limits; oncelery keeps both (publisher confirms on amqp, per-step time limits), which "
        "are part of its guarantees and counted against it",
        "oncelery rows empty the bench database's ledger tables before they start, so every row "
        "starts alike; their workers consume the main and the retry queue",
        f"each row warms up with {options.warmup} orders, not measured; orders/s = N / (first "
        "enqueue → last completion seen, polled every 50 ms); enqueue/s = N / time one producer "
        "takes to send them (for oncelery: job rows, messages and the outbox mark)",
        f"idle latency: {options.latency_orders} orders one at a time, enqueue → done seen "
        "(oncelery: announced by a trigger of the bench database, heard with LISTEN; the "
        "baseline: its file sizes, polled every 0.2 ms)",
        "CPU ms/order: utime+stime of the worker's main process and pool children over the "
        "measured window / N (Postgres', the broker's, the sandbox's and the producer's CPU are "
        "not included); peak RSS: sum of VmHWM of the worker's processes",
        "the sandbox row runs the real order-placed pipeline against an `oncelery sandbox` "
        "started for it (no faults); it has no target",
    ]
    if statements_unavailable is None:
        found.append(
            "statements/order: pg_stat_statements calls in the bench database over the measured "
            "window, the bench's own polls left out, BEGIN/COMMIT excluded; the enqueue's "
            "statements are included. A batch runs each stage's statements in one "
            "transaction, sent as one pipeline: statements per order stay the same, commits "
            "and round trips are shared"
        )
    else:
        found.append(f"statements not counted: {statements_unavailable}")
    if options.seed_jobs:
        found.append(
            "queries: seeded with set-based SQL, then VACUUM (ANALYZE); each call timed "
            "as the product makes it (median of 7), the sweeper's with its 20 stalled and 20 "
            "undispatched jobs made stalled again before each execution; plans under EXPLAIN "
            "(ANALYZE, BUFFERS) in a transaction rolled back; the seeded rows are deleted after"
        )
    return found


def run_intake(
    settings: Settings, options: IntakeOptions, log: Callable[[str], None]
) -> list[IntakeRun]:
    """`oncelery bench --intake`: the webhook under load (see `jobs.tools.bench.intake`)."""
    signal.signal(signal.SIGTERM, _interrupt)
    return run_intake_bench(settings.database_url, settings.data_dir, options, log)


def print_intake(runs: list[IntakeRun], console: Console) -> None:
    """The intake runs, one line each, and what the figures mean."""
    for run in runs:
        console.print(run.line(), markup=False, highlight=False)
    console.print(
        "note: each run starts a fresh `oncelery api` (uvicorn, one process, its outbox relay "
        "thread included) on the bench database, warms it up, then posts the events over "
        "kept-alive connections, each client sending its next event when the last is "
        "answered; latency is send → whole answer read, at the client; API CPU is the API "
        "process's utime+stime over the measured window / events",
        markup=False,
        highlight=False,
    )
