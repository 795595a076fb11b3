"""Real processes for system tests: the sandbox provider and `celery -A jobs worker`s on a
chosen broker and database, stopped by process group id when the test ends."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import child_environment
from jobs.ops.history import history_view
from jobs.tools import processes
from ledger import JobState, JobStore, create_engine
from tests.conftest import REPO_ROOT
from tests.waiting import wait_for

#: Fast retries, so a test with injected faults finishes in seconds.
TEST_WORKER_SETTINGS = {
    "ONCELERY_RETRY_BACKOFF_BASE": "0.05",
    "ONCELERY_RETRY_BACKOFF_MAX": "0.5",
    "ONCELERY_RETRY_MAX_ATTEMPTS": "12",
    "ONCELERY_PROVIDER_TIMEOUT": "2",
    "ONCELERY_PIPELINES": "tests.toy_pipeline",
}
FINISHED = (JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.CANCELLED)


@dataclass
class System:
    """A running oncelery: sandbox, workers, and the environment they share."""

    env: dict[str, str]
    data_dir: Path
    provider_url: str
    store: JobStore
    log_dir: Path
    started: list[processes.ManagedProcess] = field(default_factory=list)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `oncelery ARGS` against this system."""
        return subprocess.run(
            [sys.executable, "-m", "jobs", *args],
            input=stdin,
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def enqueue(self, events: Sequence[dict[str, object]]) -> list[str]:
        """Enqueue events through the CLI (JSON Lines on stdin); returns the job ids."""
        done = self.cli("enqueue", "-", stdin="".join(json.dumps(e) + "\n" for e in events))
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    def start_worker(
        self, name: str, *, concurrency: int = 2, extra_env: dict[str, str] | None = None
    ) -> processes.ManagedProcess:
        """Start one more `celery -A jobs worker`."""
        argv = processes.worker_argv(name, concurrency=concurrency)
        env = {**self.env, **(extra_env or {})}
        worker = processes.start(name, argv, env=env, log_dir=self.log_dir)
        self.started.append(worker)
        return worker

    def start_shop_worker(
        self, name: str, *, concurrency: int = 2, extra_env: dict[str, str] | None = None
    ) -> processes.ManagedProcess:
        """Start a worker of a user's own app with decorated tasks, `jobs.tools.shop`."""
        env = {**self.env, **(extra_env or {})}
        argv = processes.worker_argv(
            name, concurrency=concurrency, app="jobs.tools.shop", queues="shop"
        )
        worker = processes.start(name, argv, env=env, log_dir=self.log_dir)
        self.started.append(worker)
        return worker

    def start_beat(self) -> processes.ManagedProcess:
        """Start `celery -A jobs beat` (the sweeper)."""
        argv = processes.beat_argv(self.data_dir / "beat-schedule")
        beat = processes.start("beat", argv, env=self.env, log_dir=self.log_dir)
        self.started.append(beat)
        return beat

    def start_api(self, **env: str) -> str:
        """Start `oncelery api` with `env` (its `API_TOKEN`, say); returns its base URL."""
        port = processes.free_port()
        argv = [sys.executable, "-m", "jobs", "api", "--port", str(port)]
        api = processes.start("api", argv, env={**self.env, **env}, log_dir=self.log_dir)
        self.started.append(api)
        base = f"http://127.0.0.1:{port}"
        processes.wait_until_answers(f"{base}/healthz", process=api)
        return base

    def wait_finished(
        self, event_prefix: str, count: int, *, timeout: float = 180.0
    ) -> dict[JobState, int]:
        """Wait until `count` jobs of the prefix are finished; returns the counts by state."""
        counts: dict[JobState, int] = {}

        def finished() -> dict[JobState, int] | None:
            counts.update(self.store.count_by_state(event_prefix=event_prefix))
            if sum(counts[state] for state in FINISHED) >= count:
                return counts
            for process in self.started:
                assert process.alive(), f"{process.name} died; see {process.log_path}"
            return None

        return wait_for(
            finished,
            lambda: f"{count} jobs to finish: {counts}; logs in {self.log_dir}",
            timeout=timeout,
            interval=0.2,
        )

    def faults(self, **faults: object) -> None:
        """Change the sandbox's faults at run time (`POST /sandbox/faults`)."""
        response = httpx.post(f"{self.provider_url}/sandbox/faults", json=faults, timeout=10)
        assert response.status_code == 200, response.text

    def history(self, job_id: str) -> dict[str, Any]:
        """What `oncelery history JOB_ID --json` prints, read in this process: a CLI run costs
        a second of CPU, and tests read histories in loops and polls (the command itself is
        run by the tests of the CLI and the read surfaces)."""
        for module in filter(None, self.env.get("ONCELERY_PIPELINES", "").split(",")):
            importlib.import_module(module)
        view = history_view(self.store.history(uuid.UUID(job_id)))
        same_as_printed: dict[str, Any] = json.loads(json.dumps(view, default=str))
        return same_as_printed

    def cli_json(self, *args: str, expect: int = 0) -> dict[str, Any]:
        """Run a `--json` command, check its exit code, return its object."""
        done = self.cli(*args, "--json")
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll `condition` until it holds, failing with `what` after `timeout` seconds."""
        wait_for(condition, f"{what}; logs in {self.log_dir}", timeout=timeout)

    def effects(self) -> list[dict[str, object]]:
        """What the sandbox applied."""
        answer: list[dict[str, object]] = httpx.get(
            f"{self.provider_url}/sandbox/effects", timeout=30
        ).json()
        return answer

    def requests(self) -> list[dict[str, object]]:
        """What the sandbox received."""
        answer: list[dict[str, object]] = httpx.get(
            f"{self.provider_url}/sandbox/requests", timeout=30
        ).json()
        return answer


SystemFactory = Callable[..., System]


def build_system(
    data_dir: Path,
    *,
    database_url: str | None,
    broker_url: str | None,
    workers: int = 2,
    sandbox_options: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> System:
    """A running system whose files are in `data_dir`: its database upgraded, a sandbox and
    `workers` workers started (stop them with `processes.stop_all(system.started)`)."""
    port = processes.free_port()
    provider_url = f"http://127.0.0.1:{port}"
    overrides = {
        **TEST_WORKER_SETTINGS,
        "ONCELERY_DATA_DIR": str(data_dir),
        "PROVIDER_URL": provider_url,
        "PYTHONPATH": str(REPO_ROOT),
        **(extra_env or {}),
    }
    if database_url:
        overrides["DATABASE_URL"] = database_url
    if broker_url:
        overrides["BROKER_URL"] = broker_url
    env = child_environment(overrides)
    ledger_url = database_url or f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    system = System(
        env, data_dir, provider_url, JobStore(engine=create_engine(ledger_url)), data_dir / "logs"
    )
    try:
        upgraded = system.cli("db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        options = ["--hang-seconds", "3", *sandbox_options]
        argv = processes.sandbox_argv(port, db_path=data_dir / "sandbox.sqlite3", options=options)
        sandbox = processes.start("sandbox", argv, env=env, log_dir=system.log_dir)
        system.started.append(sandbox)
        processes.wait_until_answers(f"{provider_url}/healthz", process=sandbox)
        for number in range(workers):
            system.start_worker(f"worker{number}")
    except BaseException:
        processes.stop_all(system.started)
        system.store.engine.dispose()
        raise
    return system


@pytest.fixture
def system_factory(tmp_path: Path) -> Iterator[SystemFactory]:
    """Builds running systems; every process they started is stopped at teardown.

    Request it after the database and broker fixtures: fixtures are torn down in reverse
    order, and the workers must stop before their database is dropped.
    """
    systems: list[System] = []

    def build(**options: Any) -> System:
        system = build_system(tmp_path / f"data{len(systems)}", **options)
        systems.append(system)
        return system

    yield build
    for system in systems:
        processes.stop_all(system.started)
        system.store.engine.dispose()


def per_order(effects: Sequence[dict[str, object]], kind: str) -> dict[str, int]:
    """How many effects of a kind each order got."""
    counts: dict[str, int] = {}
    for effect in effects:
        if effect["kind"] == kind:
            order = str(effect["order_id"])
            counts[order] = counts.get(order, 0) + 1
    return counts
