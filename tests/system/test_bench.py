"""`oncelery bench`, a smoke run on Redis: every row is measured in real worker processes (and a
real sandbox), the history is seeded and the queries timed, and the JSON carries every figure.
The figures themselves are not asserted: this box is shared and small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import child_environment
from jobs.tools.bench.report import FIGURES
from jobs.tools.databases import bench_database_url, drop_bench_database
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.system

ROWS = ("baseline", "chained", "fast", "sandbox")
QUERIES = (
    "JobStore.take_stalled",
    "JobStore.take_undispatched",
    "JobStore.recent_deliveries",
    "LedgerStats.snapshot",
    "DeadLetterStore.count_open",
)


def test_a_smoke_bench_reports_every_row_and_figure(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Given a Postgres ledger (the bench works in <its name>_bench) and a Redis,
    # when a small bench runs
    done = _bench(
        postgres_url, tmp_path, ["--redis-url", redis_url, "--orders", "50", "--runs", "1"],
        ["--latency-orders", "10", "--seed-jobs", "2000"], timeout=240,
    )  # fmt: skip

    # Then it succeeds with one JSON object holding every row, figure, query and target
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {(row["broker"], row["row"]): row for row in report["rows"]}
    assert set(rows) == {("redis", name) for name in ROWS}
    counted = report["environment"]["statements_counted"]
    for row in rows.values():
        for figure in FIGURES:
            value = row[figure]
            if figure.endswith("_per_order") and figure != "cpu_ms_per_order" and not counted:
                assert value is None
            else:
                assert isinstance(value, int | float), (row["row"], figure, value)
        assert len(row["runs"]) == 1
    assert rows[("redis", "baseline")]["ratio"] == 1.0
    timings = {timing["name"]: timing for timing in report["queries"]["timings"]}
    assert set(timings) == set(QUERIES)
    for timing in timings.values():
        assert isinstance(timing["median_ms"], float)
        assert timing["statements"], timing["name"]
        assert all(statement["plan"] for statement in timing["statements"])
    assert timings["JobStore.take_stalled"]["found"] == "40"
    assert report["targets"]
    assert report["environment"]["notes"]


def test_a_smoke_intake_bench_reports_its_figures(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Given a Postgres ledger and a Redis, when a small intake bench runs
    done = _bench(
        postgres_url, tmp_path, ["--intake", "--redis-url", redis_url, "--orders", "60"],
        ["--concurrency", "5", "--runs", "1"], timeout=180,
    )  # fmt: skip

    # Then every event was accepted and every figure is there (their values are not asserted)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = json.loads(done.stdout)["intake"]
    assert (run["broker"], run["events"], run["concurrency"]) == ("redis", 60, 5)
    assert run["statuses"] == {"202": 60}
    for figure in ("answers_per_s", "p50_ms", "p99_ms", "api_cpu_ms_per_event"):
        assert isinstance(run[figure], float), figure
    assert run["relay_drained_after_s"] is not None


def test_a_smoke_map_bench_runs_the_chord_and_the_map(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Given a Postgres ledger and a Redis (its broker and the chord's result backend),
    # when a small map bench runs
    done = _bench(
        postgres_url, tmp_path, ["--map", "300", "--redis-url", redis_url], ["--runs", "1"],
        timeout=180,
    )  # fmt: skip

    # Then both rows ran every item once, joined once, and report their figures
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["map"]
    rows = {row["row"]: row for row in report["rows"]}
    assert set(rows) == {"chord", "map"}
    for row in rows.values():
        [run] = row["runs"]
        assert (run["items"], run["stamped"]) == (300, 300), row["row"]
        for figure in ("items_per_s", "join_lag_ms", "cpu_ms_per_item", "peak_rss_mib"):
            assert isinstance(row[figure], float), (row["row"], figure)
    assert rows["chord"]["ratio"] == 1.0
    assert {target["name"] for target in report["targets"]} == {
        "map vs chord (redis)",
        "join lag p99 (redis)",
    }


def test_a_smoke_timer_bench_fires_the_stream_with_and_without_pending_timers(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Given a Postgres ledger and a Redis, when a small timer bench runs
    options = ["--timers", "300", "--timer-rate", "100", "--timer-seconds", "1"]
    done = _bench(postgres_url, tmp_path, [*options, "--redis-url", redis_url], timeout=180)

    # Then the stream fired and its steps ran, with none and with 300 pending, each phase
    # with its figures; and the firing statement's plan is on the pending timers' index
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [(p["pending"], p["fired"], p["done"]) for p in report["phases"]] == [
        (0, 100, 100),
        (300, 100, 100),
    ]
    for phase in report["phases"]:
        for figure in ("late_p50_ms", "late_p99_ms", "loop_rss_mib", "worker_rss_mib"):
            assert isinstance(phase[figure], float), figure
    assert any("ix_timers_due_at_pending" in line for line in report["firing_plan"])


def _bench(
    postgres_url: str, tmp_path: Path, *options: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`oncelery bench --broker redis … --json` on the ledger's `_bench` database, dropped after."""
    env = child_environment(
        {"DATABASE_URL": postgres_url, "ONCELERY_DATA_DIR": str(tmp_path / "data")}
    )
    argv = [sys.executable, "-m", "jobs", "bench", "--broker", "redis", "--json"]
    try:
        return subprocess.run(
            [*argv, *(option for group in options for option in group)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        drop_bench_database(bench_database_url(postgres_url))
