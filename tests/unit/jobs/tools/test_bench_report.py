"""`oncelery bench`'s pure parts: ratios per round, medians per row, the targets, the broker
options, the bench database's name and the reading of EXPLAIN plans."""

from __future__ import annotations

import pytest

from jobs.tools.bench.command import BenchOptions, BenchReport, brokers_for
from jobs.tools.bench.report import FIGURES, check_targets, summarize
from jobs.tools.bench.rows import Broker, RowKind, RowRun
from jobs.tools.bench.seed import QueryTiming, execution_ms, scans
from jobs.tools.databases import Calls, bench_database_url, database_name

PLAN = [
    "Update on jobs  (cost=8.45..16.48 rows=1 width=69) (actual time=0.061..0.061 rows=0 loops=1)",
    "  ->  Nested Loop  (cost=8.45..16.48 rows=1 width=58)",
    "        ->  Index Only Scan using ix_jobs_state_updated_at on jobs jobs_1  (cost=0.42..8.44)",
    "        ->  Seq Scan on dead_letters  (cost=0.00..1.01 rows=1 width=8)",
    "        ->  Bitmap Index Scan on ix_step_events_kind_at  (cost=0.00..4.3 rows=5 width=0)",
    "Planning Time: 0.210 ms",
    "Execution Time: 0.118 ms",
]


def run(
    kind: RowKind,
    broker: str,
    number: int,
    orders_per_s: float,
    *,
    enqueue_per_s: float = 1500.0,
    latency_p50_ms: float | None = 2.0,
    statements_per_order: float | None = 4.0,
) -> RowRun:
    """One round's figures of a row."""
    return RowRun(
        kind=kind,
        broker=broker,
        round=number,
        orders_per_s=orders_per_s,
        enqueue_per_s=enqueue_per_s,
        cpu_ms_per_order=4.0,
        latency_p50_ms=latency_p50_ms,
        latency_p95_ms=3.0,
        statements_per_order=statements_per_order,
        peak_rss_mib=250.0,
    )


def test_ratios_are_taken_to_the_baseline_of_the_same_round_then_the_median() -> None:
    # Given two rounds where the machine was slower in the second
    runs = [
        run(RowKind.BASELINE, "redis", 1, 300.0),
        run(RowKind.FAST, "redis", 1, 600.0),
        run(RowKind.BASELINE, "redis", 2, 200.0),
        run(RowKind.FAST, "redis", 2, 300.0),
        run(RowKind.BASELINE, "redis", 3, 250.0),
        run(RowKind.FAST, "redis", 3, 400.0),
    ]

    # When they are summarised
    rows = {(row.broker, row.kind): row for row in summarize(runs)}

    # Then each round's ratio is its own (2.0, 1.5, 1.6): the median is 1.6
    fast = rows[("redis", RowKind.FAST)]
    assert fast.figures["ratio"] == pytest.approx(1.6)
    assert fast.figures["orders_per_s"] == 400.0
    assert rows[("redis", RowKind.BASELINE)].figures["ratio"] == 1.0
    assert [r["ratio"] for r in fast.runs] == pytest.approx([2.0, 1.5, 1.6])
    assert set(fast.as_json()) >= {"broker", "row", "title", "runs", *FIGURES}


def test_targets_are_checked_broker_by_broker_and_query_by_query() -> None:
    runs = [
        run(RowKind.BASELINE, "amqp", 1, 400.0),
        run(RowKind.CHAINED, "amqp", 1, 300.0, enqueue_per_s=900.0),
        run(RowKind.FAST, "amqp", 1, 620.0, latency_p50_ms=3.5),
    ]
    queries = [
        QueryTiming("JobStore.take_stalled", 4.0, [4.0], "20"),
        QueryTiming("LedgerStats.snapshot", 85.0, [85.0], "1000000 jobs"),
    ]

    targets = {t.name: t for t in check_targets(summarize(runs), queries)}

    assert targets["fast path vs baseline (amqp)"].met is True
    assert targets["chained vs baseline (amqp)"].met is True
    assert targets["fast path idle p50 (amqp)"].met is False
    assert targets["enqueue rate, slower oncelery row (amqp)"].value == 900.0
    assert targets["enqueue rate, slower oncelery row (amqp)"].met is False
    assert targets["JobStore.take_stalled"].met is True
    assert targets["LedgerStats.snapshot"].met is False


def test_a_row_without_statement_counts_reports_them_unknown() -> None:
    runs = [run(RowKind.BASELINE, "redis", 1, 300.0, statements_per_order=None)]

    [row] = summarize(runs)

    assert row.figures["statements_per_order"] is None
    report = BenchReport(BenchOptions(brokers=(Broker("redis", "redis://x/3"),)), [row])
    assert report.as_json()["rows"][0]["statements_per_order"] is None  # type: ignore[index]


def test_brokers_for_names_the_option_at_fault() -> None:
    amqp, redis = "amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/3"

    assert [b.kind for b in brokers_for("all", amqp_url=amqp, redis_url=redis)] == [
        "amqp",
        "redis",
    ]
    assert brokers_for("redis", amqp_url="nonsense", redis_url=redis) == (Broker("redis", redis),)
    with pytest.raises(ValueError, match="--broker"):
        brokers_for("kafka", amqp_url=amqp, redis_url=redis)
    with pytest.raises(ValueError, match="--redis-url"):
        brokers_for("all", amqp_url=amqp, redis_url=amqp)


def test_the_bench_database_is_the_ledgers_name_with_a_suffix() -> None:
    url = "postgresql+psycopg://oncelery:secret@db.example:5433/ledger"

    bench = bench_database_url(url)

    assert database_name(bench) == "ledger_bench"
    assert bench.startswith("postgresql+psycopg://oncelery:secret@db.example:5433/")


def test_calls_subtract() -> None:
    assert Calls(10) - Calls(4) == Calls(6)


def test_plans_are_summarised_by_their_scans_and_execution_time() -> None:
    assert execution_ms(PLAN) == pytest.approx(0.118)
    assert scans(PLAN) == [
        "Index Only Scan using ix_jobs_state_updated_at on jobs",
        "Seq Scan on dead_letters",
        "Bitmap Index Scan on ix_step_events_kind_at",
    ]
    assert execution_ms(["Seq Scan on jobs"]) is None
