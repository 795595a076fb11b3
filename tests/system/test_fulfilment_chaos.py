"""order-fulfilment under fire, opt-in (`TEST_FULFILMENT_CHAOS=1`, several minutes a broker;
figures in the closing notes, not in CI): `oncelery chaos --pipeline order-fulfilment` with
1,000 orders (`TEST_FULFILMENT_CHAOS_ORDERS`), half signalled shipped through the signed route,
the Python API and the CLI (some before their job waits, some twice), 10 % 5xx and 5 %
timeouts, a worker SIGKILLed every 2 s, the broker and Postgres (servers of the test's own)
restarted mid-run: every order gets exactly one shipping notice, the one its wait says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.tools import processes
from tests.conftest import REPO_ROOT
from tests.services import OwnPostgres, OwnRabbitMQ, OwnRedis, running
from tests.system.test_chaos import _environment

pytestmark = [
    pytest.mark.system,
    pytest.mark.chaos,
    pytest.mark.skipif(
        not os.environ.get("TEST_FULFILMENT_CHAOS"), reason="opt-in: TEST_FULFILMENT_CHAOS=1"
    ),
    pytest.mark.timeout(3600),
]

ORDERS = int(os.environ.get("TEST_FULFILMENT_CHAOS_ORDERS", "1000"))


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_fulfilment_under_fire(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = OwnPostgres.new()
    broker = (OwnRabbitMQ if kind == "amqp" else OwnRedis)(tmp_path / kind, processes.free_port())
    with running(database) as database_url, running(broker) as broker_url:
        env = _environment(tmp_path, database_url, broker_url, database, broker)
        done = subprocess.run(
            [
                *(sys.executable, "-m", "jobs", "chaos", "--pipeline", "order-fulfilment"),
                *("--orders", str(ORDERS), "--kill-every", "2", "--reminder-after", "60"),
                *("--broker-restart", "--db-restart", "--json"),
            ],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )

    report = json.loads(done.stdout)
    summary = next(line for line in done.stderr.splitlines() if line.startswith("chaos "))
    with capsys.disabled():
        print(f"\n{summary}")
    assert done.returncode == 0, (summary, report["violations"][:20])
    assert report["ok"] is True
    assert report["completed"] + report["dead_lettered"] == ORDERS
    assert report["shipping_notices"] == report["completed"]
    assert report["order_shipped"] == report["waits_by_signal"]
    assert report["ship_reminders"] == report["waits_by_timeout"]
    assert report["signals_duplicate"] > 0
    assert set(report["signals_by_way"]) == {"webhook", "python", "cli"}
    assert report["kills"] >= 5
    assert report["restarts"] == 2
