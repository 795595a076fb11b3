"""The Procfile, run by honcho against the local services: orders go through, and stopping
honcho leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from config import child_environment
from jobs.tools import processes
from jobs.worker.tasks import BEAT_HEARTBEAT
from ledger import JobState, JobStore, create_engine
from tests.conftest import REPO_ROOT
from tests.factories import order_event
from tests.system.conftest import TEST_WORKER_SETTINGS, System, per_order
from tests.waiting import wait_for

pytestmark = pytest.mark.system


def process_groups_below(root: int) -> set[int]:
    """The process groups of `root`'s descendants other than its own (honcho starts each
    Procfile line in a session of its own)."""
    parents = processes.process_table()
    below: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in parents.items() if ppid in frontier} - below
        below |= frontier
    return {parents[pid][1] for pid in below if pid in parents} - {root}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_procfile_runs_the_system(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    # Given the Procfile's processes started by honcho, on Postgres and Redis
    sandbox_port, flower_port, web_port = (processes.free_port() for _ in range(3))
    provider_url = f"http://127.0.0.1:{sandbox_port}"
    env = child_environment(
        {
            **TEST_WORKER_SETTINGS,
            "DATABASE_URL": postgres_url,
            "BROKER_URL": redis_url,
            "ONCELERY_DATA_DIR": str(tmp_path / "data"),
            "PROVIDER_URL": provider_url,
            "SANDBOX_PORT": str(sandbox_port),
            "FLOWER_PORT": str(flower_port),
            "FLOWER_BASIC_AUTH": "ops:secret",
            "PYTHONPATH": str(REPO_ROOT),
            # honcho gives PORT to the first line, web, and the next hundreds to the others.
            "PORT": str(web_port),
            "API_TOKEN": "procfile-token-0123",
            "WEBHOOK_SECRET": "procfile-secret-0123",
        }
    )
    honcho_start = [
        *(sys.executable, "-m", "honcho", "start"),
        *("-f", str(REPO_ROOT / "Procfile"), "-d", str(REPO_ROOT)),
    ]
    # The release line first, alone (as README says): honcho stops every process once one ends.
    release = subprocess.run(
        [*honcho_start, "release"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert release.returncode == 0, release.stdout + release.stderr
    assert "ledger schema is up to date" in release.stdout
    honcho = processes.start(
        "honcho", [*honcho_start, "-c", "release=0"], env=env, log_dir=tmp_path / "logs"
    )
    store = JobStore(engine=create_engine(postgres_url))
    system = System(env, tmp_path / "data", provider_url, store, tmp_path / "logs", [honcho])
    groups: set[int] = set()
    try:
        processes.wait_until_answers(f"{provider_url}/healthz", process=honcho, timeout=60)

        def all_started() -> bool:
            nonlocal groups
            groups = process_groups_below(honcho.pid)
            return len(groups) >= 5

        wait_for(
            all_started, lambda: f"five process groups, saw {groups}", timeout=30, interval=0.2
        )
        assert len(groups) == 5, groups  # sandbox, worker, beat, flower, web

        # When orders are enqueued
        prefix = f"procfile-{uuid.uuid4().hex[:6]}-"
        system.enqueue(
            [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(20)]
        )

        # Then they complete once each, and Flower answers, behind its basic auth
        assert system.wait_finished(prefix, 20, timeout=120)[JobState.SUCCEEDED] == 20
        assert set(per_order(system.effects(), "charge").values()) == {1}
        processes.wait_until_answers(
            f"http://127.0.0.1:{flower_port}/healthcheck", process=honcho, timeout=60
        )
        web = f"http://127.0.0.1:{web_port}/healthz"
        processes.wait_until_answers(web, process=honcho, timeout=60)
        # Beat's healthcheck in docker-compose.yml reads the file its sweeper touches.
        heartbeat = tmp_path / "data" / BEAT_HEARTBEAT
        wait_for(heartbeat.exists, lambda: f"{heartbeat} to be touched", timeout=60)
        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        assert httpx.get(flower, timeout=10).status_code == 401
        assert httpx.get(flower, auth=("ops", "secret"), timeout=10).status_code == 200

        # When honcho is stopped, every process it started stops too
        honcho.popen.send_signal(signal.SIGTERM)
        honcho.popen.wait(timeout=60)
        wait_for(
            lambda: not any(group_alive(g) for g in groups),
            lambda: f"every process group to stop: {[g for g in groups if group_alive(g)]} alive",
            timeout=30,
            interval=0.2,
        )
    finally:
        honcho.stop()
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        store.engine.dispose()


def procfile_command(name: str) -> str:
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise AssertionError(f"no {name} line in the Procfile")


def compose_command(service: str) -> str:
    """A service's one-line command (a flow sequence that is also JSON) as its shell gets it:
    compose turns `$$` into `$`."""
    lines = (REPO_ROOT / "docker-compose.yml").read_text().splitlines()
    start = lines.index(f"  {service}:")
    found = next(line for line in lines[start:] if line.startswith("    command: ["))
    command = json.loads(found.removeprefix("    command: "))
    assert command[:2] == ["sh", "-c"], command
    return str(command[2]).replace("$$", "$")


@pytest.mark.parametrize("source", ["Procfile", "docker-compose.yml"])
@pytest.mark.parametrize("auth", [None, "", "admin", "admin:", ":secret"])
def test_flower_refuses_to_start_without_a_login(
    tmp_path: Path, source: str, auth: str | None
) -> None:
    # A `celery` that says it ran: the guard must stop before Flower is started at all.
    fake = tmp_path / "bin" / "celery"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho flower started\n")
    fake.chmod(0o755)
    command = procfile_command("flower") if source == "Procfile" else compose_command("flower")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth

    done = subprocess.run(
        ["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode == 2
    assert "flower started" not in done.stdout
    assert done.stderr.strip().count("\n") == 0
    assert "FLOWER_BASIC_AUTH" in done.stderr


@pytest.mark.parametrize("source", ["Procfile", "docker-compose.yml"])
def test_flower_starts_with_a_login(tmp_path: Path, source: str) -> None:
    fake = tmp_path / "bin" / "celery"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "flower started: $*"\n')
    fake.chmod(0o755)
    command = procfile_command("flower") if source == "Procfile" else compose_command("flower")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "FLOWER_BASIC_AUTH": "ops:secret"}

    done = subprocess.run(
        ["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flower started: -A jobs flower --port=5555")
