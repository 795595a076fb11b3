"""`oncelery chaos --tasks`, lean, on each real broker: chains of a user's decorated Celery tasks
while workers are SIGKILLed every second or two must end with every call's effect once, the
audit clean, nothing lost or stuck. (No broker restart here: the big run is the lead's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import child_environment
from jobs.tools import processes
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.system, pytest.mark.chaos]

#: Chains per run, a kill every 1.5 s: enough for several kills to land mid-run (about ten
#: seconds of chains); `oncelery chaos --tasks --orders 300 --kill-every 2 --broker-restart`
#: is the big run.
CHAINS = 60


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_chaos_tasks(
    kind: str,
    postgres_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker_url = str(request.getfixturevalue(f"{kind}_url"))
    env = child_environment(
        {
            "DATABASE_URL": postgres_url,
            "BROKER_URL": broker_url,
            "ONCELERY_DATA_DIR": str(tmp_path / "data"),
            "PROVIDER_URL": f"http://127.0.0.1:{processes.free_port()}",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    argv = ["chaos", "--tasks", "--orders", str(CHAINS), "--kill-every", "1.5", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "jobs", *argv],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(done.stdout)
    summary = next(line for line in done.stderr.splitlines() if line.startswith("chaos "))
    with capsys.disabled():
        print(f"\n{summary}")

    assert done.returncode == 0, (summary, report["violations"][:20])
    assert report["completed"] == CHAINS
    assert (report["duplicate_charges"], report["lost"], report["stuck"]) == (0, 0, 0)
    assert report["charges"] == report["notifications"] == CHAINS
    assert report["kills"] >= 3
