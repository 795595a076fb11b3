"""Flower against the real broker: it lists the workers and the three step tasks with their
states, refuses a request without its basic auth, and serves Prometheus metrics."""

from __future__ import annotations

import sys
import uuid

import httpx
import pytest

from jobs.tools import processes
from ledger import JobState
from tests.factories import order_event
from tests.system.conftest import SystemFactory

pytestmark = pytest.mark.system

AUTH = ("ops", "flower-secret")


def test_flower_sees_workers_and_step_tasks(
    postgres_url: str, redis_url: str, system_factory: SystemFactory
) -> None:
    # Given Flower watching the broker, with basic auth from FLOWER_BASIC_AUTH
    system = system_factory(database_url=postgres_url, broker_url=redis_url)
    port = processes.free_port()
    flower = processes.start(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "jobs",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env={**system.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)},
        log_dir=system.log_dir,
    )
    system.started.append(flower)
    base = f"http://127.0.0.1:{port}"
    processes.wait_until_answers(f"{base}/healthcheck", process=flower, timeout=60)

    # When orders run
    prefix = f"flower-{uuid.uuid4().hex[:6]}-"
    system.enqueue(
        [order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(5)]
    )
    assert system.wait_finished(prefix, 5)[JobState.SUCCEEDED] == 5

    # Then Flower lists the workers and every step task, succeeded. A refresh lists only the
    # workers that answer its inspect calls within a second: a loaded one may need another.
    def worker_names() -> set[str]:
        workers = httpx.get(
            f"{base}/api/workers", auth=AUTH, params={"refresh": "true"}, timeout=30
        )
        assert workers.status_code == 200
        return {name.split("@")[0] for name in workers.json()}

    system.wait_for(
        lambda: worker_names() == {"worker0", "worker1"}, "Flower to list the workers", timeout=30
    )

    def step_tasks() -> dict[str, set[str]]:
        tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=30).json()
        states: dict[str, set[str]] = {}
        for task in tasks.values():
            if str(task.get("name", "")).startswith("oncelery.order-placed."):
                states.setdefault(task["name"], set()).add(task["state"])
        return states

    expected = {
        f"oncelery.order-placed.{step}": {"SUCCESS"} for step in ("gather", "act", "publish")
    }
    system.wait_for(lambda: step_tasks() == expected, "Flower to see the step tasks", timeout=30)

    # And it refuses anyone without the password, and serves its metrics
    assert httpx.get(f"{base}/api/tasks", timeout=10).status_code == 401
    assert httpx.get(f"{base}/api/tasks", auth=("ops", "wrong"), timeout=10).status_code == 401
    metrics = httpx.get(f"{base}/metrics", auth=AUTH, timeout=10)
    assert metrics.status_code == 200
    assert "flower_events_total" in metrics.text
