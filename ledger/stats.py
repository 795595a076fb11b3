"""`LedgerStats`: the figures `status`, the metrics and the home page show — jobs by state, the
oldest pending job, step duration percentiles, completions per minute, histograms.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.queries import stats as stats_queries
from ledger.types import EventKind, JobState

#: Succeeded jobs counted exactly up to this many; past it, Postgres' estimate is used.
EXACT_SUCCEEDED = 50_000
#: The history events counted for the metrics.
COUNTED_EVENTS = (
    EventKind.FAILED,
    EventKind.DUPLICATE,
    EventKind.DEDUPLICATED,
    EventKind.DEAD_LETTERED,
    EventKind.REDRIVEN,
)


@dataclass(frozen=True)
class StepTiming:
    """One step's successful attempts over a window."""

    step: str
    attempts: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (`le` bounds), their count and sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True)
class Snapshot:
    """Where the ledger stands now."""

    jobs: dict[JobState, int]
    oldest_pending_age: float | None
    open_dead_letters: int
    events: dict[EventKind, int]
    steps: list[StepTiming] = field(default_factory=list)
    #: True when the succeeded count is Postgres' estimate (past `EXACT_SUCCEEDED` jobs).
    succeeded_estimated: bool = False


class LedgerStats:
    """Reads figures from the ledger. Postgres computes percentiles itself; SQLite (the
    embedded default, small by nature) has them computed here from the window's rows.

    Args:
        engine: where the ledger lives.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine
        self._postgres = db.is_postgres(engine)

    def snapshot(self, *, window: float = 300.0) -> Snapshot:
        """Jobs by state, the oldest pending job's age in seconds, open dead letters, history
        events by kind, and each step's p50/p99 over the last `window` seconds."""
        counts = dict.fromkeys(JobState, 0)
        events = dict.fromkeys(COUNTED_EVENTS, 0)
        with db.transaction(self.engine) as conn:
            for row in conn.execute(stats_queries.count_jobs_except_succeeded()):
                counts[JobState(row.state)] = int(row.jobs)
            # Counting a million succeeded rows takes 100+ ms; past a bound, estimate instead.
            succeeded = int(
                conn.execute(stats_queries.count_succeeded_jobs(EXACT_SUCCEEDED)).scalar_one()
            )
            estimated = self._postgres and succeeded >= EXACT_SUCCEEDED
            if estimated:
                rows = int(conn.execute(stats_queries.estimated_job_rows()).scalar_one())
                succeeded = max(succeeded, rows - sum(counts.values()))
            counts[JobState.SUCCEEDED] = succeeded
            clock = conn.execute(stats_queries.oldest_pending()).mappings().one()
            now: datetime = clock["now"]
            oldest: datetime | None = clock["oldest"]
            letters = int(conn.execute(queries.count_open_dead_letters()).scalar_one())
            for row in conn.execute(stats_queries.count_events_by_kind(COUNTED_EVENTS)):
                events[EventKind(row.kind)] = int(row.events)
        age = _seconds(now, oldest) if oldest is not None else None
        return Snapshot(counts, age, letters, events, self.step_timings(window=window), estimated)

    def step_timings(self, *, window: float) -> list[StepTiming]:
        """Each step's p50 and p99 duration (ms) over the last `window` seconds."""
        with db.transaction(self.engine) as conn:
            if self._postgres:
                rows = conn.execute(stats_queries.step_percentiles(window, (0.5, 0.99)))
                return [StepTiming(r.step, int(r.attempts), r.p0, r.p1) for r in rows]
            by_step: dict[str, list[float]] = defaultdict(list)
            for row in conn.execute(stats_queries.recent_durations(window)):
                by_step[row.step].append(float(row.duration_ms))
        return [
            StepTiming(step, len(values), percentile(values, 0.5), percentile(values, 0.99))
            for step, values in sorted(by_step.items())
        ]

    def per_minute(self, *, window: float = 3600.0) -> tuple[dict[str, int], dict[str, float]]:
        """Over the last `window` seconds, by minute (`YYYY-MM-DD HH:MM`, UTC): how many jobs
        succeeded, and the p99 of step durations (ms)."""
        with db.transaction(self.engine) as conn:
            completed = {
                r.minute: int(r.jobs)
                for r in conn.execute(stats_queries.completed_per_minute(window))
            }
            if self._postgres:
                p99 = {
                    r.minute: float(r.p99) for r in conn.execute(stats_queries.minute_p99(window))
                }
                return completed, p99
            by_minute: dict[str, list[float]] = defaultdict(list)
            for row in conn.execute(stats_queries.recent_durations(window)):
                by_minute[row.minute].append(float(row.duration_ms))
        return completed, {m: percentile(v, 0.99) or 0.0 for m, v in by_minute.items()}

    def step_histograms(self, bounds: Sequence[float], *, window: float) -> dict[str, Histogram]:
        """Each step's duration histogram (ms) over the last `window` seconds."""
        query = stats_queries.duration_buckets(bounds, window)
        with db.transaction(self.engine) as conn:
            rows = conn.execute(query).mappings().all()
        return {row["step"]: _histogram(row, bounds, "attempts") for row in rows}

    def schedule_to_start(self, bounds: Sequence[float], *, window: float) -> Histogram:
        """The histogram of seconds from a job's creation to its first claim, for jobs first
        claimed in the last `window` seconds."""
        query = stats_queries.schedule_to_start_buckets(bounds, window)
        with db.transaction(self.engine) as conn:
            row = conn.execute(query).mappings().one()
        return _histogram(row, bounds, "jobs")


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` percentile of `values`, interpolated like Postgres' percentile_cont."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _histogram(row: Any, bounds: Sequence[float], count: str) -> Histogram:
    cumulative = tuple(int(row[f"le{n}"] or 0) for n in range(len(bounds)))
    return Histogram(tuple(bounds), cumulative, int(row[count] or 0), float(row["total"] or 0.0))


def _seconds(now: datetime, then: datetime) -> float:
    return max(0.0, (db.as_utc(now) - db.as_utc(then)).total_seconds())
