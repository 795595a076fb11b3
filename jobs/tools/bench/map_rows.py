"""`oncelery bench --map N`: a map step of N no-op items against stock Celery's
`chord(group)` of N no-op tasks, on the same worker (prefork ×2), the same broker, rounds
interleaved. Both kinds of item stamp their end in a folder, and both joins write their time
there, so items/s and the join's lag after the last item are read the same way for each."""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.table import Table

from config import MAIN_QUEUE, RETRY_QUEUE, Settings
from jobs.engine.enqueue import start_jobs
from jobs.tools import processes
from jobs.tools.bench import BenchFailed, chord, figures
from jobs.tools.bench.map_pipeline import bench_map
from jobs.tools.bench.rows import (
    CONCURRENCY,
    Bench,
    Broker,
    clear_queues,
    inherited_environment,
    oncelery_environment,
)
from jobs.tools.databases import empty_ledger
from jobs.worker import CeleryDispatch, client_app
from ledger import JobState

#: Seconds between two looks for the join's mark.
_WAIT_INTERVAL: Final = 0.01
#: Items of each row's warm-up map (not measured).
WARMUP_ITEMS: Final = 200


class MapRowKind(enum.StrEnum):
    """What a map row measures."""

    #: Stock Celery: `chord(group)` of no-op tasks, a Redis result backend, no ledger.
    CHORD = "chord"
    #: oncelery's map step: every item claimed and recorded, the join claimed once.
    MAP = "map"


@dataclass(frozen=True)
class MapRowRun:
    """The figures of one map row in one round."""

    kind: MapRowKind
    broker: str
    round: int
    items: int
    items_per_s: float
    #: N / (last item's end − first item's end): the workers' pace, the producer's left out.
    work_items_per_s: float
    #: The join's start after the last item's end, in ms.
    join_lag_ms: float
    #: Seconds to send the work (the chord's N messages; the map's one job).
    enqueue_s: float
    cpu_ms_per_item: float
    statements_per_item: float | None
    peak_rss_mib: float | None
    #: Item ends stamped (more than `items` if an item ran twice).
    stamped: int


def run_map_row(
    bench: Bench, kind: MapRowKind, broker: Broker, number: int, *, items: int, backend_url: str
) -> MapRowRun:
    """Run one map row in a fresh worker: a warm-up map, then one of `items` items."""
    name = f"map{number}-{broker.kind}-{kind}"
    folder = bench.work_dir / name
    empty_ledger(bench.store.engine)
    started: list[processes.ManagedProcess] = []
    closers: list[Callable[[], None]] = []
    try:
        if kind is MapRowKind.CHORD:
            clear_queues(broker.url, [chord.CHORD_QUEUE])
            send, env = _chord_sender(broker, backend_url, closers)
        else:
            clear_queues(broker.url, [MAIN_QUEUE, RETRY_QUEUE])
            send, env = _map_sender(bench, broker, name, closers)
        worker = processes.start(
            f"{name}-worker", _worker_argv(kind, name), env=env, log_dir=bench.log_dir
        )
        started.append(worker)
        warm = folder / "warm"
        warm.mkdir(parents=True)
        send(warm, WARMUP_ITEMS)
        _wait_joined(warm, started, bench, timeout=120.0)
        main = folder / "main"
        main.mkdir()
        cpu_before, calls_before = figures.group_cpu_seconds(worker.pid), bench.counter.read()
        began = time.time()
        send(main, items)
        sent = time.time()
        joined = _wait_joined(main, started, bench, timeout=60.0 + items * 0.02)
        cpu = figures.group_cpu_seconds(worker.pid) - cpu_before
        calls_after = bench.counter.read()
        ends = chord.stamps(main)
        statements = None
        if kind is MapRowKind.MAP and calls_before is not None and calls_after is not None:
            statements = (calls_after - calls_before).statements / items
        return MapRowRun(
            kind=kind,
            broker=broker.kind,
            round=number,
            items=items,
            items_per_s=items / (joined - began),
            work_items_per_s=items / (max(ends) - min(ends)) if len(ends) > 1 else float("nan"),
            join_lag_ms=(joined - max(ends)) * 1000 if ends else float("nan"),
            enqueue_s=sent - began,
            cpu_ms_per_item=cpu * 1000 / items,
            statements_per_item=statements,
            peak_rss_mib=figures.group_peak_rss_mib(worker.pid),
            stamped=len(ends),
        )
    finally:
        processes.stop_all(started)
        for close in closers:
            close()


Sender = Callable[[Path, int], None]


def _chord_sender(
    broker: Broker, backend_url: str, closers: list[Callable[[], None]]
) -> tuple[Sender, dict[str, str]]:
    sender = chord.client(broker.url, backend_url)
    closers.append(sender.close)
    env = {
        **inherited_environment(),
        "CELERY_BROKER_URL": broker.url,
        "CELERY_RESULT_BACKEND": backend_url,
    }
    return (lambda folder, count: chord.send_chord(sender, folder, count)), env


def _map_sender(
    bench: Bench, broker: Broker, name: str, closers: list[Callable[[], None]]
) -> tuple[Sender, dict[str, str]]:
    settings = Settings.model_validate(
        {
            "database_url_raw": bench.bench_url,
            "broker_url_raw": broker.url,
            "task_events": False,
            "pipelines": ("jobs.tools.bench.map_pipeline",),
            "data_dir": bench.work_dir / "data",
        }
    )
    sender = client_app(settings)
    closers.append(sender.close)
    dispatch = CeleryDispatch(sender=sender, settings=settings)

    def send(folder: Path, count: int) -> None:
        run = f"{bench.run_id}-{name}-{folder.name}"
        job = bench_map.new_job(run, {"run": run, "items": count, "folder": str(folder)})
        [started] = start_jobs(bench.store, dispatch, bench_map, [job])  # type: ignore[arg-type]
        if not started.sent:
            raise BenchFailed(f"the map job of {name} was stored but could not be sent")

    return send, {**inherited_environment(), **oncelery_environment(settings)}


def _worker_argv(kind: MapRowKind, name: str) -> list[str]:
    if kind is MapRowKind.MAP:
        return processes.worker_argv(f"bench-{name}", concurrency=CONCURRENCY, loglevel="WARNING")
    return [
        sys.executable, "-m", "celery", "-A", "jobs.tools.bench.chord", "worker",
        "--hostname", f"bench-{name}@%h", "--concurrency", str(CONCURRENCY),
        "--pool", "prefork", "--queues", chord.CHORD_QUEUE, "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def _wait_joined(
    folder: Path, started: list[processes.ManagedProcess], bench: Bench, *, timeout: float
) -> float:
    """The wall-clock time the join ran, once its mark is there.

    Raises:
        BenchFailed: the worker died, a map job was dead-lettered, or no join in `timeout`.
    """
    deadline = time.monotonic() + timeout
    looks = 0
    while (joined := chord.joined_at(folder)) is None:
        looks += 1
        for process in started:
            if not process.alive():
                raise BenchFailed(f"{process.name} exited; see {process.log_path}")
        if looks % 100 == 0:
            counts = bench.store.count_by_state(event_prefix=bench.run_id)
            if counts[JobState.DEAD_LETTERED] or counts[JobState.CANCELLED]:
                raise BenchFailed(f"the map of {folder} was dead-lettered; see the worker log")
        if time.monotonic() > deadline:
            log = started[-1].log_path
            raise BenchFailed(f"no join in {folder} after {timeout:.0f}s; see {log}")
        time.sleep(_WAIT_INTERVAL)
    return joined


@dataclass
class MapReport:
    """Every round of `oncelery bench --map`, summarised row by row."""

    runs: list[MapRowRun]
    notes: list[str]

    def rows(self) -> list[dict[str, object]]:
        """Each (broker, kind): the median of each figure, the ratio of items/s to the chord of
        the same round, and the join's lag at p99 over the rounds."""
        chords = {
            (run.broker, run.round): run.items_per_s
            for run in self.runs
            if run.kind is MapRowKind.CHORD
        }
        grouped: dict[tuple[str, MapRowKind], list[MapRowRun]] = {}
        for run in self.runs:
            grouped.setdefault((run.broker, run.kind), []).append(run)
        rows = []
        for (broker, kind), runs in grouped.items():
            ratios = [figures.ratio(r.items_per_s, chords.get((r.broker, r.round))) for r in runs]
            row: dict[str, object] = {"broker": broker, "row": str(kind)}
            for name in _MAP_FIGURES:
                row[name] = _rounded(figures.median([getattr(r, name) for r in runs]))
            row["ratio"] = _rounded(figures.median(ratios))
            lags = [r.join_lag_ms for r in runs]
            row["join_lag_p99_ms"] = _rounded(figures.percentile(lags, 0.99))
            row["runs"] = [{**vars(r), "kind": str(r.kind)} for r in runs]
            rows.append(row)
        return rows

    def targets(self) -> list[dict[str, object]]:
        """The issue's two targets per broker: items/s ≥ 1.5× the chord, the join ≤ 100 ms
        after the last item (p99 over the rounds)."""
        found = []
        for row in self.rows():
            if row["row"] != MapRowKind.MAP:
                continue
            ratio, lag = row["ratio"], row["join_lag_p99_ms"]
            found += [
                _met(f"map vs chord ({row['broker']})", "≥ 1.5×", ratio, lambda v: v >= 1.5),
                _met(f"join lag p99 ({row['broker']})", "≤ 100 ms", lag, lambda v: v <= 100),
            ]
        return found

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {"map": {"rows": self.rows(), "targets": self.targets(), "notes": self.notes}}

    def table(self) -> Table:
        """The rows, one line each, medians."""
        items = self.runs[0].items if self.runs else 0
        table = Table(
            "broker", "row", "items/s", "× chord", "items/s at work", "join lag ms (p99)",
            "CPU ms/item",
            "stmts/item", "peak RSS MiB", "enqueue s",
            title=f"oncelery bench --map: {items:,} no-op items, prefork ×{CONCURRENCY}",
        )  # fmt: skip
        for row in self.rows():
            table.add_row(
                str(row["broker"]),
                _MAP_TITLES[MapRowKind(str(row["row"]))],
                *(_shown(row[name]) for name in _MAP_COLUMNS),
            )
        return table


_MAP_TITLES: Final = {
    MapRowKind.CHORD: "Celery chord(group), Redis results",
    MapRowKind.MAP: "oncelery map step",
}
_MAP_FIGURES: Final = (
    "items_per_s",
    "work_items_per_s",
    "join_lag_ms",
    "enqueue_s",
    "cpu_ms_per_item",
    "statements_per_item",
    "peak_rss_mib",
)
_MAP_COLUMNS: Final = (
    "items_per_s",
    "ratio",
    "work_items_per_s",
    "join_lag_p99_ms",
    "cpu_ms_per_item",
    "statements_per_item",
    "peak_rss_mib",
    "enqueue_s",
)


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _shown(value: object) -> str:
    if not isinstance(value, int | float):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _met(name: str, goal: str, value: object, check: Callable[[float], bool]) -> dict[str, object]:
    met = check(value) if isinstance(value, int | float) else None
    return {"name": name, "goal": goal, "value": value, "met": met}


def map_notes(items: int, runs: int) -> list[str]:
    """How the map rows' figures were taken."""
    return [
        f"each round runs a chord and a map of {items:,} no-op items per broker, interleaved, "
        f"each in a fresh `celery worker` (prefork ×{CONCURRENCY}, prefetch multiplier 4, "
        f"acks_late), after a warm-up of {WARMUP_ITEMS} items; medians over {runs} round(s)",
        "the chord is stock Celery: its header's results and its counter live in Redis (the "
        "--redis-url), nothing is durable; the map claims and records every item in the "
        "bench database's ledger and claims its join once",
        "items/s = N / (first send → the join's start, as the join stamps it): what a caller "
        "waits, the chord's N messages sent by its caller included (the map's caller sends "
        "one); items/s at work = N / (first item's end → last item's end): the workers' pace "
        "alone; join lag = the join's start − the last item's end; all stamped by the tasks "
        "themselves (wall clock)",
        "stmts/item: pg_stat_statements calls in the bench database over the window / N, the "
        "bench's own looks (one a second) included",
    ]
