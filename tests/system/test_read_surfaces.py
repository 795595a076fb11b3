"""Every read surface shows a pipeline of one's own (`toy-typed`) as it shows order-placed: the
CLI's history, status, dlq and audit; the API's jobs, dead letters and metrics; the pages. A
pipeline nobody declared is a clear error: exit 2 on the command line, 404 over HTTP."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest

from ledger import JobState
from tests.system.conftest import System, SystemFactory

pytestmark = pytest.mark.system

TOKEN = "read-surfaces-token"


def _jobs_of_ones_own(system: System, run: str) -> tuple[str, str]:
    """One `toy-typed` job that succeeds and one whose step fails for good: their ids."""
    events = [{"event_id": f"{run}-{word}", "word": word} for word in ("fine", "refused")]
    lines = "".join(json.dumps(event) + "\n" for event in events)
    done = system.cli("enqueue", "--pipeline", "toy-typed", "-", stdin=lines)
    assert done.returncode == 0, done.stderr
    fine, refused = done.stdout.split()
    counts = system.wait_finished(run, 2, timeout=60)
    assert (counts[JobState.SUCCEEDED], counts[JobState.DEAD_LETTERED]) == (1, 1), counts
    return fine, refused


def test_every_read_surface_shows_a_pipeline_of_ones_own(
    postgres_url: str, amqp_url: str, system_factory: SystemFactory
) -> None:
    # Given a job of one's own pipeline that succeeded and one that was dead-lettered
    system = system_factory(database_url=postgres_url, broker_url=amqp_url, workers=1)
    fine, refused = _jobs_of_ones_own(system, f"own-{uuid.uuid4().hex[:8]}")

    # Then the command line shows them: history,
    view = system.cli_json("history", fine)
    assert (view["pipeline"], view["state"]) == ("toy-typed", "succeeded")
    assert view["steps"][0]["output"] == {"letters": 4}
    assert system.cli_json("history", refused)["steps"][0]["error"]["type"] == "PermanentError"
    # status,
    status = system.cli_json("status")
    assert (status["jobs"]["succeeded"], status["jobs"]["dead_lettered"]) == (1, 1)
    assert status["dead_letters_open"] == 1
    assert "count" in status["steps"]
    # the dead letters,
    [letter] = system.cli_json("dlq", "list")["dead_letters"]
    assert (letter["pipeline"], letter["step"], letter["job_id"]) == ("toy-typed", "count", refused)
    assert system.cli_json("dlq", "show", str(letter["id"]))["pipeline"] == "toy-typed"
    # and the audit (a step without `effect=` has nothing to reconcile: clean);
    assert system.cli_json("audit")["clean"] is True
    # a pipeline nobody declared is one line and exit 2.
    unknown = system.cli("enqueue", "--pipeline", "nope", "-", stdin='{"event_id": "x"}\n')
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1
    assert "'nope'" in unknown.stderr

    # And over HTTP: the read API,
    base = system.start_api(API_TOKEN=TOKEN, WEBHOOK_SECRET="read-surfaces-secret")
    with httpx.Client(base_url=base, timeout=30) as api:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        listed = api.get("/jobs", params={"pipeline": "toy-typed"}, headers=bearer).json()
        assert sorted(job["job_id"] for job in listed["jobs"]) == sorted([fine, refused])
        assert api.get(f"/jobs/{fine}", headers=bearer).json()["pipeline"] == "toy-typed"
        nope = api.get("/jobs", params={"pipeline": "nope"}, headers=bearer)
        assert (nope.status_code, nope.json()["error"]["pipeline"]) == (404, "nope")
        letters = api.get("/dead-letters", headers=bearer).json()["dead_letters"]
        assert [letter["pipeline"] for letter in letters] == ["toy-typed"]
        # the metrics,
        metrics = api.get("/metrics", headers=bearer).text
        assert _sample(metrics, 'oncelery_jobs{state="succeeded"}') == 1
        assert _sample(metrics, 'oncelery_jobs{state="dead_lettered"}') == 1
        assert _sample(metrics, "oncelery_dead_letters_open") == 1
        assert 'oncelery_step_duration_seconds_count{step="count"}' in metrics
        # and the pages, once logged in.
        logged_in = api.post("/login", data={"token": TOKEN})
        assert logged_in.status_code == 303, logged_in.text
        page = api.get("/ui/jobs", params={"pipeline": "toy-typed"}).text
        assert fine in page
        assert refused in page
        assert api.get("/ui/jobs", params={"pipeline": "order-placed"}).text.count(fine) == 0
        assert api.get("/ui/jobs", params={"pipeline": "nope"}).status_code == 404
        assert "toy-typed" in api.get(f"/ui/jobs/{fine}").text
        assert "toy-typed.count" in api.get("/ui/dead-letters").text


def _sample(exposition: str, name: str) -> float:
    """One sample's value in a Prometheus exposition."""
    found: Any = re.search(rf"^{re.escape(name)} (\S+)$", exposition, flags=re.MULTILINE)
    assert found is not None, f"{name} not in the metrics"
    return float(found.group(1))
