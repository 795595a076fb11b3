"""A map step's progress in `status` (the function and the real command) and the metrics, on
Postgres and SQLite: maps driven by the engine without Celery (tests/integration/jobs/engine
/test_map_step.py's harness), one waiting for a person on a failed item, one joined."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from jobs.engine.runtime import Runtime
from jobs.ops.metrics import render_metrics
from jobs.ops.status import status_table, status_view
from jobs.worker import CeleryDispatch
from ledger import LedgerStats
from ledger.map_views import MapViews
from tests.conftest import REPO_ROOT
from tests.integration.jobs.engine.test_map_step import QueueDispatch, World, build, drain, start


def two_maps(runtime: Runtime) -> tuple[str, str, str]:
    """One map waiting for a person (its item r3 failed), one joined: the pipeline's name and
    the two job ids."""
    world = World(failing={"r3"})
    pipeline = build(world)
    dispatch = QueueDispatch()
    waiting, joined = start(runtime, pipeline, roots=8), start(runtime, pipeline, roots=3)
    for job_id in (waiting, joined):
        if job_id == joined:
            world.failing.clear()
        dispatch.send(pipeline.name, "search", job_id)
        drain(runtime, dispatch, pipeline, twice=False)
    return pipeline.name, waiting, joined


def test_status_and_metrics_sum_up_the_maps_in_progress(runtime: Runtime, tmp_path: Path) -> None:
    # Given a map waiting for a person on one item, and one joined
    name, waiting, _ = two_maps(runtime)
    [counters] = runtime.maps.counters(uuid.UUID(waiting))
    assert (counters.failed, counters.waiting, counters.joined) == (1, 1, False)

    # Then status shows the map in progress (not the joined one), from the counters
    dispatch = CeleryDispatch(settings=runtime.settings)
    view = status_view(LedgerStats(engine=runtime.engine), dispatch.sender, window=60)
    assert view["maps"] == {
        f"{name}.search": {
            "maps": 1,
            "total": counters.total,
            "done": counters.total - 1,
            "failed": 1,
            "waiting": 1,
            "pending": 0,
            "expanded": counters.expanded,
        }
    }
    console = Console(width=240, record=True, file=io.StringIO())
    console.print(status_table(view))
    text = console.export_text()
    assert "1 running" in text
    assert "1 waiting for a person" in text

    # And the metrics: items by state of the unjoined maps, maps running and joined
    metrics = render_metrics(runtime, dispatch.sender)[0].decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.labels.get("pipeline") == name
    }
    where = (("pipeline", name), ("step", "search"))
    by_state = {
        state: samples[("oncelery_map_items", tuple(sorted((*where, ("state", state)))))]
        for state in ("pending", "done", "failed", "waiting")
    }
    assert by_state == {"pending": 0, "done": counters.total - 1, "failed": 0, "waiting": 1}
    assert samples[("oncelery_maps_running", where)] == 1
    assert samples[("oncelery_maps_joined_total", where)] == 1
    # Bounded labels: a pipeline, a step, a state — never a job or an item.
    labels = {key for _, pairs in samples for key, _ in pairs}
    assert labels == {"pipeline", "step", "state"}


def test_a_joined_or_cancelled_map_is_not_in_progress(runtime: Runtime) -> None:
    name, waiting, _ = two_maps(runtime)
    runtime.store.cancel(uuid.UUID(waiting), by="test", reason="test")

    assert MapViews(engine=runtime.engine).in_progress() == []
    assert MapViews(engine=runtime.engine).joined() == {(name, "search"): 1}


def test_the_status_command_shows_the_maps(runtime: Runtime, tmp_path: Path) -> None:
    name, _, _ = two_maps(runtime)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": runtime.settings.database_url,
        "ONCELERY_DATA_DIR": str(tmp_path),
    }

    def status(*flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "jobs", "status", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    maps = json.loads(status("--json"))["maps"]
    assert list(maps) == [f"{name}.search"]
    assert (maps[f"{name}.search"]["maps"], maps[f"{name}.search"]["waiting"]) == (1, 1)
    assert f"map {name}.search" in status()
