"""`oncelery bench --seed-jobs M`: M finished jobs inserted with set-based SQL into the bench
database, then the queries the sweeper and `status` run timed on them, each statement shown
under EXPLAIN (ANALYZE, BUFFERS) — data-modifying ones in a transaction rolled back."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobs.engine.sweeper import PACE_WINDOW
from jobs.tools.bench import sql
from jobs.tools.databases import bench_errors
from ledger import DeadLetterStore, JobStore, LedgerStats

#: Jobs per seeding statement.
_CHUNK: Final = 100_000
#: Stalled running jobs, and pending jobs left in the outbox, seeded for the sweeper to find.
UNFINISHED: Final = 20
#: Executions timed per query.
REPEATS: Final = 7
#: The issue's target for each query with 1,000,000 finished jobs, in ms.
TARGET_MS: Final = 20.0
_SCAN = re.compile(
    r"((?:Parallel )?(?:Seq|Index Only|Index|Bitmap Heap|Bitmap Index) Scan(?: Backward)?"
    r"(?: using \S+)?(?: on \S+)?)"
)
_EXECUTION = re.compile(r"Execution Time: ([\d.]+) ms")


@dataclass(frozen=True)
class PlannedStatement:
    """One statement a query runs, and its plan."""

    sql: str
    plan: list[str]
    execution_ms: float | None
    #: The plan's scans, e.g. `Index Only Scan using ix_jobs_state_updated_at on jobs`.
    scans: list[str]


@dataclass(frozen=True)
class QueryTiming:
    """One public call the sweeper or `status` makes, timed."""

    name: str
    median_ms: float
    runs_ms: list[float]
    #: What the call found (rows taken, or a count), to show it did real work.
    found: str
    statements: list[PlannedStatement] = field(default_factory=list)

    @property
    def meets_target(self) -> bool:
        """Under the issue's 20 ms."""
        return self.median_ms < TARGET_MS


def seed_history(engine: Engine, count: int, log: Callable[[str], None]) -> float:
    """Insert `count` finished jobs (and a few unfinished ones), then vacuum and analyze as
    autovacuum would; returns the seconds it took."""
    began = time.perf_counter()
    with bench_errors("seeding the bench database"):
        for first in range(1, count + 1, _CHUNK):
            last = min(first + _CHUNK - 1, count)
            with engine.begin() as conn:
                conn.execute(sql.seed_finished_jobs(first, last))
            log(f"seeded {last:,} of {count:,} finished jobs")
        with engine.begin() as conn:
            conn.execute(sql.seed_unfinished_jobs(UNFINISHED))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sql.vacuum_analyze())
    return time.perf_counter() - began


def time_queries(engine: Engine, *, stalled_after: float, relay_after: float) -> list[QueryTiming]:
    """Time the sweeper's and `status`'s calls (median of several) and explain their
    statements."""
    store = JobStore(engine=engine)
    stats = LedgerStats(engine=engine)
    letters = DeadLetterStore(engine=engine)
    cases: list[tuple[str, Callable[[], object], sa.TextClause | None]] = [
        (
            "JobStore.take_stalled",
            lambda: len(store.take_stalled(stalled_after=stalled_after)),
            sql.stall_again(),
        ),
        (
            "JobStore.take_undispatched",
            lambda: len(store.take_undispatched(older_than=relay_after)),
            sql.undispatch_again(),
        ),
        (
            "JobStore.recent_deliveries",
            lambda: store.recent_deliveries(window=PACE_WINDOW),
            None,
        ),
        ("LedgerStats.snapshot", lambda: _snapshot_summary(stats), None),
        ("DeadLetterStore.count_open", letters.count_open, None),
    ]
    with bench_errors("timing the queries"):
        return [_time_one(engine, name, call, reset) for name, call, reset in cases]


def _snapshot_summary(stats: LedgerStats) -> str:
    snapshot = stats.snapshot(window=300.0)
    jobs = sum(snapshot.jobs.values())
    return f"{jobs} jobs, {len(snapshot.steps)} steps timed"


def _time_one(
    engine: Engine, name: str, call: Callable[[], object], reset: sa.TextClause | None
) -> QueryTiming:
    def again() -> None:
        if reset is not None:
            with engine.begin() as conn:
                conn.execute(reset)

    again()
    found, captured = _capture(engine, call)
    runs = []
    for _ in range(REPEATS):
        again()
        began = time.perf_counter()
        call()
        runs.append((time.perf_counter() - began) * 1000)
    statements = []
    for statement, parameters in captured.items():
        again()
        statements.append(explain(engine, statement, parameters))
    again()
    return QueryTiming(name, statistics.median(runs), runs, str(found), statements)


def _capture(
    engine: Engine, call: Callable[[], object]
) -> tuple[object, dict[str, Mapping[str, object]]]:
    """Run `call` once, noting each distinct statement it sends and its first parameters."""
    seen: dict[str, Mapping[str, object]] = {}

    def note(_conn: object, _cursor: object, statement: str, parameters: Any, *_: object) -> None:
        # psycopg's paramstyle is pyformat: parameters come as one mapping.
        seen.setdefault(statement, dict(parameters) if isinstance(parameters, Mapping) else {})

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        found = call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    return found, seen


def explain(
    engine: Engine, statement: str, parameters: Mapping[str, Any] | Any
) -> PlannedStatement:
    """EXPLAIN (ANALYZE, BUFFERS) of a statement as the driver received it, in a transaction
    rolled back afterwards (ANALYZE runs it: an UPDATE would take effect)."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            rows = conn.exec_driver_sql(sql.explain(statement), dict(parameters)).all()
        finally:
            transaction.rollback()
    plan = [str(row[0]) for row in rows]
    return PlannedStatement(
        sql=" ".join(statement.split()),
        plan=plan,
        execution_ms=execution_ms(plan),
        scans=scans(plan),
    )


def execution_ms(plan: list[str]) -> float | None:
    """The `Execution Time` of an EXPLAIN ANALYZE plan, in ms."""
    for line in plan:
        found = _EXECUTION.search(line)
        if found:
            return float(found.group(1))
    return None


def scans(plan: list[str]) -> list[str]:
    """The scans of a plan, in plan order (`Seq Scan on jobs`, `Index Scan using … on …`)."""
    return [found.group(1) for line in plan if (found := _SCAN.search(line))]
