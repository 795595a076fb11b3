"""The chaos suite: `oncelery chaos` on each real broker — 300 orders, 10 % 5xx and 5 %
timeouts, a worker SIGKILLed every two seconds, the broker and Postgres restarted mid-run —
must end with every invariant holding. The servers it restarts are its own (`tests.services`),
so the other tests go on meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import child_environment
from jobs.tools import processes
from tests.conftest import REPO_ROOT
from tests.services import OwnPostgres, OwnRabbitMQ, OwnRedis, running

pytestmark = [pytest.mark.system, pytest.mark.chaos]

#: Orders per run: enough for every kind of fault to land mid-run (the closing notes of the
#: issues report longer runs, `oncelery chaos --orders 10000`).
ORDERS = 300


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_chaos(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = OwnPostgres.new()
    broker = (OwnRabbitMQ if kind == "amqp" else OwnRedis)(tmp_path / kind, processes.free_port())
    with running(database) as database_url, running(broker) as broker_url:
        env = _environment(tmp_path, database_url, broker_url, database, broker)
        done = _chaos(env)

    report = json.loads(done.stdout)
    summary = next(line for line in done.stderr.splitlines() if line.startswith("chaos "))
    with capsys.disabled():
        print(f"\n{summary}")

    assert done.returncode == 0, (summary, report["violations"][:20])
    assert report["ok"] is True
    assert report["completed"] + report["dead_lettered"] == ORDERS
    assert (report["duplicate_charges"], report["duplicate_notifications"], report["stuck"]) == (
        0,
        0,
        0,
    )
    assert report["kills"] >= 5
    assert report["restarts"] == 2


def test_chaos_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a map of 60 roots (96 items with their splits) on servers of the test's own
    database, broker = OwnPostgres.new(), OwnRedis(tmp_path / "redis", processes.free_port())
    with running(database) as database_url, running(broker) as broker_url:
        env = _environment(tmp_path, database_url, broker_url, database, broker)
        # When it runs under faults, kills every 2 s, a broker and a Postgres restart
        done = _chaos(env, "--map", "60")

    report = json.loads(done.stdout)
    summary = next(line for line in done.stderr.splitlines() if line.startswith("chaos "))
    with capsys.disabled():
        print(f"\n{summary}")

    # Then every item's notification was applied once, and the join's once
    assert done.returncode == 0, (summary, report["violations"][:20])
    assert (report["items"], report["visited"], report["joins"]) == (96, 96, 1)
    assert (report["duplicate_visits"], report["missing_visits"]) == (0, 0)
    assert report["job_state"] == "succeeded"
    assert report["kills"] >= 3
    assert report["restarts"] == 2


def _environment(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    database: OwnPostgres,
    broker: OwnRabbitMQ | OwnRedis,
) -> dict[str, str]:
    """A chaos run's environment: the test's own servers, restarted by their own commands."""
    return child_environment(
        {
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "ONCELERY_DATA_DIR": str(tmp_path / "data"),
            "PROVIDER_URL": f"http://127.0.0.1:{processes.free_port()}",
            "ONCELERY_CHAOS_BROKER_RESTART": broker.restart_command,
            "ONCELERY_CHAOS_DATABASE_RESTART": database.restart_command,
        }
    )


def _chaos(env: dict[str, str], *what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs",
            "chaos",
            *(what or ("--orders", str(ORDERS))),
            "--kill-every",
            "2",
            "--broker-restart",
            "--db-restart",
            "--json",
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
