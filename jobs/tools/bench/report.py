"""What `oncelery bench` reports: each row's medians over the rounds, its ratio to the baseline,
the issue's targets checked, and the tables people read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

from rich.table import Table

from jobs.tools.bench import figures
from jobs.tools.bench.rows import RowKind, RowRun
from jobs.tools.bench.seed import TARGET_MS, QueryTiming

#: Each row's title.
TITLES: Final = {
    RowKind.BASELINE: "bare Celery chain, no ledger",
    RowKind.CHAINED: "oncelery, chained (null provider)",
    RowKind.FAST: "oncelery, fast path (null provider)",
    RowKind.SANDBOX: "oncelery, fast path + sandbox",
}
#: The figures of a row, in table order.
FIGURES: Final = (
    "orders_per_s",
    "ratio",
    "latency_p50_ms",
    "latency_p95_ms",
    "statements_per_order",
    "cpu_ms_per_order",
    "peak_rss_mib",
    "enqueue_per_s",
)
_HEADERS: Final = (
    "orders/s",
    "× baseline",
    "p50 ms",
    "p95 ms",
    "stmts/order",
    "CPU ms/order",
    "peak RSS MiB",
    "enqueue/s",
)


@dataclass(frozen=True)
class RowSummary:
    """One row: the median of each figure over the rounds, and every round's figures."""

    broker: str
    kind: RowKind
    figures: dict[str, float | None]
    runs: list[dict[str, object]] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {
            "broker": self.broker,
            "row": str(self.kind),
            "title": TITLES[self.kind],
            **{name: _round(value) for name, value in self.figures.items()},
            "runs": self.runs,
        }


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, and whether this bench met it (None: not measured)."""

    name: str
    goal: str
    value: float | None
    met: bool | None


def summarize(runs: Sequence[RowRun]) -> list[RowSummary]:
    """Each (broker, row)'s medians, ratios taken to the baseline of the same round."""
    baseline = {
        (run.broker, run.round): run.orders_per_s for run in runs if run.kind is RowKind.BASELINE
    }
    grouped: dict[tuple[str, RowKind], list[dict[str, object]]] = {}
    for run in runs:
        figures_of_run = asdict(run)
        figures_of_run["kind"] = str(run.kind)
        figures_of_run["ratio"] = figures.ratio(
            run.orders_per_s, baseline.get((run.broker, run.round))
        )
        grouped.setdefault((run.broker, run.kind), []).append(figures_of_run)
    summaries = []
    for (broker, kind), rounds in grouped.items():
        medians = {name: figures.median([_number(r[name]) for r in rounds]) for name in FIGURES}
        summaries.append(RowSummary(broker, kind, medians, rounds))
    return summaries


def check_targets(rows: Sequence[RowSummary], queries: Sequence[QueryTiming]) -> list[Target]:
    """The issue's targets, broker by broker, and the queries'."""
    found = {(row.broker, row.kind): row.figures for row in rows}
    targets = []
    for broker in dict.fromkeys(row.broker for row in rows):
        fast = found.get((broker, RowKind.FAST), {})
        chained = found.get((broker, RowKind.CHAINED), {})
        enqueue = [v for v in (fast.get("enqueue_per_s"), chained.get("enqueue_per_s")) if v]
        targets += [
            _target(f"fast path vs baseline ({broker})", "≥ 1.5×", fast.get("ratio"), 1.5, True),
            _target(f"chained vs baseline ({broker})", "≥ 0.70×", chained.get("ratio"), 0.70, True),
            _target(
                f"fast path idle p50 ({broker})", "≤ 3 ms", fast.get("latency_p50_ms"), 3.0, False
            ),
            _target(
                f"enqueue rate, slower oncelery row ({broker})",
                "≥ 1000 orders/s",
                min(enqueue) if enqueue else None,
                1000.0,
                True,
            ),
        ]
    for query in queries:
        targets.append(
            Target(query.name, f"< {TARGET_MS:g} ms", query.median_ms, query.meets_target)
        )
    return targets


def _target(name: str, goal: str, value: float | None, bound: float, at_least: bool) -> Target:
    if value is None:
        return Target(name, goal, None, None)
    return Target(name, goal, round(value, 3), value >= bound if at_least else value <= bound)


def rows_table(rows: Sequence[RowSummary], title: str) -> Table:
    """The rows, one line each, medians."""
    table = Table("broker", "row", *_HEADERS, title=title)
    for row in rows:
        table.add_row(row.broker, TITLES[row.kind], *(_shown(row.figures[f]) for f in FIGURES))
    return table


def queries_table(queries: Sequence[QueryTiming], seeded: int) -> Table:
    """The timed queries: median, what they found, their scans."""
    table = Table(
        "query",
        "median ms",
        "found",
        f"< {TARGET_MS:g} ms",
        "scans",
        title=f"sweeper and status queries with {seeded:,} finished jobs",
    )
    for query in queries:
        scans = "; ".join(dict.fromkeys(s for st in query.statements for s in st.scans))
        met = "yes" if query.meets_target else "NO"
        table.add_row(query.name, f"{query.median_ms:.2f}", query.found, met, scans)
    return table


def targets_table(targets: Sequence[Target]) -> Table:
    """Each target and whether it was met."""
    table = Table("target", "goal", "reached", "met", title="targets (issue 6)")
    for target in targets:
        met = {True: "yes", False: "NO", None: "not measured"}[target.met]
        table.add_row(target.name, target.goal, _shown(target.value), met)
    return table


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _shown(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"
