"""`oncelery bench --timers N`: the timer loop with N timers pending far in the future and a
stream falling due at a steady rate, against the same stream with none pending. Each phase
starts a fresh beat (the timer loop) and a fresh worker (which runs the step each fired timer
sends); the figures are the firing lateness, due → step done, both processes' peak memory and
the cost of `status`'s timer counts; with N pending, the plan of the loop's firing statement."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import sqlalchemy as sa
from rich.console import Console
from rich.rule import Rule

from config import MAIN_QUEUE, RETRY_QUEUE
from jobs.engine.timers import FIRE_BATCH
from jobs.tools import processes
from jobs.tools.bench import BenchFailed, figures
from jobs.tools.bench.rows import CONCURRENCY, Bench, Broker, clear_queues, inherited_environment
from jobs.tools.bench.seed import explain
from jobs.tools.bench.timer_pipeline import BENCH_TIMERS_PIPELINE
from jobs.tools.bench.timer_seed import seed_far, seed_stream
from jobs.tools.databases import bench_errors, empty_ledger
from ledger import TimerLedger
from ledger.queries import timers as timer_queries

#: Seconds between two looks while a phase runs.
_POLL: Final = 0.5
#: Seconds from the seeding of the stream to its first due timer (the processes are up).
_LEAD: Final = 2.0
#: The issue's target: firing lateness p99 at 1,000 due a second, with N pending.
TARGET_P99_S: Final = 1.0
#: Timers made due at once for the plan of the firing statement (a round's worth).
_EXPLAINED_DUE: Final = 500


@dataclass(frozen=True)
class TimerOptions:
    """What `bench --timers` measures."""

    pending: int
    rate: float = 1000.0
    seconds: float = 30.0

    @property
    def stream(self) -> int:
        """Timers of the stream measured."""
        return max(1, round(self.rate * self.seconds))


@dataclass(frozen=True)
class TimerPhase:
    """One phase's figures: lateness in ms, memory in MiB, the counts' cost in ms."""

    broker: str
    pending: int
    due: int
    fired: int
    done: int
    late_p50_ms: float | None
    late_p99_ms: float | None
    late_max_ms: float | None
    done_p50_ms: float | None
    done_p99_ms: float | None
    loop_rss_mib: float | None
    worker_rss_mib: float | None
    counts_ms: float


@dataclass
class TimerReport:
    """Everything `bench --timers` found."""

    options: TimerOptions
    phases: list[TimerPhase] = field(default_factory=list)
    seed_seconds: float | None = None
    plan: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        """For `--json`: one object."""
        return {
            "pending": self.options.pending,
            "rate": self.options.rate,
            "seconds": self.options.seconds,
            "seed_seconds": self.seed_seconds,
            "phases": [asdict(phase) for phase in self.phases],
            "firing_plan": self.plan,
            "notes": self.notes(),
        }

    def lines(self) -> list[str]:
        """The phases, one line each, for people (a table would be cut at 80 columns)."""
        found = [
            f"oncelery bench --timers {self.options.pending:,}: a stream of "
            f"{self.options.stream:,} timers due at {self.options.rate:g}/s"
        ]
        for phase in self.phases:
            found.append(
                f"{phase.broker} with {phase.pending:,} pending: {phase.fired:,} fired, "
                f"{phase.done:,} done; late p50 {_ms(phase.late_p50_ms)} ms, p99 "
                f"{_ms(phase.late_p99_ms)} ms, max {_ms(phase.late_max_ms)} ms; due→done p50 "
                f"{_ms(phase.done_p50_ms)} ms, p99 {_ms(phase.done_p99_ms)} ms; RSS loop "
                f"{_ms(phase.loop_rss_mib)} MiB, worker {_ms(phase.worker_rss_mib)} MiB; "
                f"counts {_ms(phase.counts_ms)} ms"
            )
        return found

    def print(self, console: Console) -> None:
        """The table, the firing statement's plan and the notes, for people."""
        for line in self.lines():
            console.print(line, markup=False, highlight=False)
        if self.plan:
            console.print(Rule("the timer loop's firing statement, with the pending timers"))
            console.print("\n".join(self.plan), markup=False, highlight=False)
        for note in self.notes():
            console.print(f"note: {note}", markup=False, highlight=False)

    def notes(self) -> list[str]:
        """How the figures were taken, and the target."""
        found = [
            "each phase starts a fresh `celery -A jobs beat` (the timer loop, with the sweeper "
            f"and the relay) and one `celery -A jobs worker` (prefork ×{CONCURRENCY}), waits "
            "for a probe timer to fire and its step to be done, then seeds the stream due "
            f"from {_LEAD:g} s later; stopped after it",
            "late = fired_at − due_at of the stream's timers (the database's clock); due→done "
            "= the job's finish (the step the timer sent, run by the worker) − due_at",
            "RSS: peak resident memory (VmHWM) of beat's process, and the sum over the worker's "
            "main process and pool children",
            "counts ms: `TimerLedger.stats` (what `status` and the metrics read), median of 7, "
            "after the stream fired",
            "pending timers are seeded with set-based SQL a month ahead and more, one job each "
            "asleep at the bench pipeline's sleep step, then VACUUM (ANALYZE)",
        ]
        for phase in self.phases:
            if phase.pending >= 1_000_000 and phase.late_p99_ms is not None:
                met = phase.late_p99_ms <= TARGET_P99_S * 1000
                found.append(
                    f"target ({phase.broker}): lateness p99 ≤ {TARGET_P99_S:g} s at "
                    f"{self.options.rate:g} due/s with {phase.pending:,} pending: "
                    f"{'met' if met else 'NOT met'} ({phase.late_p99_ms:.0f} ms)"
                )
        return found


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def run_timer_bench(
    bench: Bench, brokers: tuple[Broker, ...], options: TimerOptions, log: Callable[[str], None]
) -> TimerReport:
    """The stream with none pending, then with `options.pending` pending, on each broker;
    the bench database is left empty."""
    engine = bench.store.engine
    report = TimerReport(options)
    try:
        empty_ledger(engine)
        for broker in brokers:
            report.phases.append(_phase(bench, broker, options, 0, log))
        if options.pending:
            empty_ledger(engine)
            log(f"seeding {options.pending:,} pending timers")
            report.seed_seconds = seed_far(engine, f"far-{bench.run_id}", options.pending, log)
            report.plan = _firing_plan(bench)
            for broker in brokers:
                report.phases.append(_phase(bench, broker, options, options.pending, log))
    finally:
        empty_ledger(engine)
    return report


def _phase(
    bench: Bench, broker: Broker, options: TimerOptions, pending: int, log: Callable[[str], None]
) -> TimerPhase:
    name = f"timers-{broker.kind}-{pending}"
    folder = bench.work_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    clear_queues(broker.url, [MAIN_QUEUE, RETRY_QUEUE])
    env = {
        **inherited_environment(),
        "DATABASE_URL": bench.bench_url,
        "BROKER_URL": broker.url,
        "ONCELERY_DATA_DIR": str(folder / "data"),
        "ONCELERY_PIPELINES": "jobs.tools.bench.timer_pipeline",
        "ONCELERY_TASK_EVENTS": "false",
    }
    engine = bench.store.engine
    started: list[processes.ManagedProcess] = []
    runs: list[tuple[str, int]] = []
    try:
        beat_argv = processes.beat_argv(folder / "beat-schedule", loglevel="WARNING")
        worker_argv = processes.worker_argv(
            f"bench-{name}", concurrency=CONCURRENCY, loglevel="WARNING"
        )
        for process, argv in (("beat", beat_argv), ("worker", worker_argv)):
            started.append(
                processes.start(f"{name}-{process}", argv, env=env, log_dir=bench.log_dir)
            )
        beat, worker = started
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        runs.append((probe, 1))
        since = _now(bench)
        seed_stream(engine, probe, 1, start=datetime.now(UTC), rate=1.0)
        _wait(lambda: _progress(bench, since)[1] >= 1, started, "the probe timer's step", 120.0)
        run = f"stream-{uuid.uuid4().hex[:8]}"
        runs.append((run, options.stream))
        since = _now(bench)
        start = datetime.now(UTC) + timedelta(seconds=_LEAD)
        log(f"{name}: {options.stream:,} timers due at {options.rate:g}/s from {start:%H:%M:%S}")
        seed_stream(engine, run, options.stream, start=start, rate=options.rate)
        _wait(
            lambda: _progress(bench, since)[1] >= options.stream,
            started,
            f"the stream's {options.stream:,} steps",
            options.seconds + 300.0,
        )
        late, done = _lateness(bench, since)
        counts_ms = _time_counts(bench)
        phase = TimerPhase(
            broker=broker.kind,
            pending=pending,
            due=options.stream,
            fired=len(late),
            done=len(done),
            late_p50_ms=figures.percentile(late, 0.5),
            late_p99_ms=figures.percentile(late, 0.99),
            late_max_ms=max(late, default=None),
            done_p50_ms=figures.percentile(done, 0.5),
            done_p99_ms=figures.percentile(done, 0.99),
            loop_rss_mib=figures.group_peak_rss_mib(beat.pid),
            worker_rss_mib=figures.group_peak_rss_mib(worker.pid),
            counts_ms=counts_ms,
        )
        log(
            f"{name}: late p50 {_ms(phase.late_p50_ms)} ms, p99 {_ms(phase.late_p99_ms)} ms; "
            f"loop {_ms(phase.loop_rss_mib)} MiB, worker {_ms(phase.worker_rss_mib)} MiB"
        )
        return phase
    finally:
        processes.stop_all(started)
        for each, count in runs:
            _forget(bench, each, count)


def _wait(
    done: Callable[[], bool],
    started: list[processes.ManagedProcess],
    what: str,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        for process in started:
            if not process.alive():
                raise BenchFailed(f"{process.name} exited; see {process.log_path}")
        if time.monotonic() > deadline:
            raise BenchFailed(f"{what} not done after {timeout:.0f} s; see {started[0].log_path}")
        time.sleep(_POLL)


# What a phase reads as it goes, by the indexes on `timers.fired_at` and `jobs.finished_at`
# (nothing else fires or finishes meanwhile): never a walk of the million pending.
_PROGRESS = sa.text(
    "SELECT (SELECT count(*) FROM timers WHERE fired_at >= :since), "
    "(SELECT count(*) FROM jobs WHERE finished_at >= :since AND state = 'succeeded')"
)
_LATENESS = sa.text(
    "SELECT EXTRACT(EPOCH FROM t.fired_at - t.due_at) * 1000 AS late, "
    "EXTRACT(EPOCH FROM j.finished_at - t.due_at) * 1000 AS done "
    "FROM timers t JOIN jobs j ON j.id = t.job_id WHERE t.fired_at >= :since"
)
_FORGET = sa.text(
    "DELETE FROM jobs WHERE id IN (SELECT CAST(md5(CAST(:run AS text) || '-' || g) AS uuid) "
    "FROM generate_series(1, CAST(:count AS bigint)) AS g)"
)


def _now(bench: Bench) -> datetime:
    """The database's clock."""
    with bench.store.engine.connect() as conn:
        found: datetime = conn.execute(sa.text("SELECT now()")).scalar_one()
    return found


def _progress(bench: Bench, since: datetime) -> tuple[int, int]:
    """Timers fired since `since`, and jobs done since."""
    with bench.store.engine.connect() as conn:
        row = conn.execute(_PROGRESS, {"since": since}).one()
    return int(row[0]), int(row[1])


def _lateness(bench: Bench, since: datetime) -> tuple[list[float], list[float]]:
    """The firing lateness and due → done of the timers fired since `since`, in ms."""
    with bench.store.engine.connect() as conn:
        rows = conn.execute(_LATENESS, {"since": since}).all()
    late = [max(0.0, float(row.late)) for row in rows]
    done = [float(row.done) for row in rows if row.done is not None]
    return late, done


def _time_counts(bench: Bench) -> float:
    """`TimerLedger.stats`, median of 7 calls, in ms."""
    timers = TimerLedger(engine=bench.store.engine)
    runs = []
    for _ in range(7):
        began = time.perf_counter()
        timers.stats()
        runs.append((time.perf_counter() - began) * 1000)
    return statistics.median(runs)


def _forget(bench: Bench, run: str, count: int) -> None:
    """Delete a seeded run's jobs (their timers, entries and events go with them), found
    by their ids: the pending ones stay for the next phase."""
    with bench_errors("deleting a seeded run"), bench.store.engine.begin() as conn:
        conn.execute(_FORGET, {"run": run, "count": count})


def _firing_plan(bench: Bench) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the timer loop's firing statement with the pending
    timers seeded and a round's worth due, in a transaction rolled back."""
    engine = bench.store.engine
    run = f"explain-{uuid.uuid4().hex[:8]}"
    due = datetime.now(UTC) - timedelta(seconds=60)
    seed_stream(engine, run, _EXPLAINED_DUE, start=due, rate=1000.0)
    try:
        statement = timer_queries.fire_due("postgresql", FIRE_BATCH, [BENCH_TIMERS_PIPELINE])
        compiled = statement.compile(
            dialect=engine.dialect, compile_kwargs={"render_postcompile": True}
        )
        return explain(engine, str(compiled), compiled.params).plan
    finally:
        _forget(bench, run, _EXPLAINED_DUE)
