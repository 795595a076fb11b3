"""`oncelery jobs` and `oncelery --version`, run as real processes on the embedded default (a
SQLite ledger, kombu's file transport): what they print, and bad input as one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.factories import order_event

REPO_ROOT = Path(__file__).resolve().parents[4]


def oncelery(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m jobs ARGS` on the data folder's embedded ledger, in a 40-column terminal."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ONCELERY_") and name not in ("DATABASE_URL", "BROKER_URL")
    }
    environment.update(
        ONCELERY_DATA_DIR=str(data_dir),
        COLUMNS="40",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A data folder with three enqueued jobs (no worker: they stay pending); their ids."""
    data_dir = tmp_path_factory.mktemp("jobs") / "data"
    assert oncelery(data_dir, "db", "upgrade").returncode == 0
    ids = []
    for n in range(3):
        event = order_event(event_id=f"evt-list-{n}", order_id=f"ord-list-{n}")
        done = oncelery(data_dir, "enqueue", "-", stdin=json.dumps(event))
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())
    return data_dir, ids


def test_jobs_lists_the_newest_first_with_whole_ids(ledger: tuple[Path, list[str]]) -> None:
    data_dir, ids = ledger

    done = oncelery(data_dir, "jobs")

    assert done.returncode == 0, done.stderr
    positions = [done.stdout.index(job_id) for job_id in ids]
    assert positions == sorted(positions, reverse=True)
    assert "…" not in done.stdout
    assert "so far" in done.stdout
    assert done.stderr.strip() == "3 job(s)"


def test_jobs_json_filters_and_limit(ledger: tuple[Path, list[str]]) -> None:
    data_dir, ids = ledger

    everything = json.loads(oncelery(data_dir, "jobs", "--json").stdout)["jobs"]
    newest = json.loads(oncelery(data_dir, "jobs", "--json", "--limit", "1").stdout)["jobs"]
    by_event = json.loads(oncelery(data_dir, "jobs", "--json", "--event-id", "evt-list-1").stdout)
    by_order = json.loads(
        oncelery(
            data_dir, "jobs", "--json", "--order-id", "ord-list-2", "--state", "pending"
        ).stdout
    )
    done = json.loads(oncelery(data_dir, "jobs", "--json", "--state", "succeeded").stdout)

    assert [job["job_id"] for job in everything] == ids[::-1]
    assert everything[0]["state"] == "pending"
    assert everything[0]["order_id"] == "ord-list-2"
    assert everything[0]["finished_at"] is None
    assert [job["job_id"] for job in newest] == [ids[2]]
    assert [job["job_id"] for job in by_event["jobs"]] == [ids[1]]
    assert [job["job_id"] for job in by_order["jobs"]] == [ids[2]]
    assert done == {"jobs": []}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--state", "done"), "--state: there is no job state 'done'"),
        (("--state", "pending", "--state", "nope"), "'nope'"),
        (("--pipeline", "nope"), "--pipeline: no pipeline named 'nope'"),
        (("--limit", "0"), "--limit"),
        (("--limit", "many"), "--limit"),
        (("--event-id", ""), "--event-id: empty"),
    ],
)
def test_jobs_bad_input_is_one_line(
    ledger: tuple[Path, list[str]], args: tuple[str, ...], named: str
) -> None:
    done = oncelery(ledger[0], "jobs", *args)

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert named in line


def test_version_is_the_package_metadata(tmp_path: Path) -> None:
    done = oncelery(tmp_path, "--version")

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"oncelery {metadata.version('oncelery')}\n"
