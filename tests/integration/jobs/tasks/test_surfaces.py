"""Decorated tasks' calls where people look: the read API, the pages, the metrics and the audit
of the HTTP intake (in process, real Postgres and Redis), after calls of the shop ran here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobs.errors import CallDeadLettered
from jobs.ops.audit import run_audit
from jobs.tools import shop
from jobs.web.intake import create_app
from ledger import JobStore
from tests.conftest import settings_for
from tests.integration.jobs.web.test_intake import Client

TOKEN = "token-integration-test"


@pytest.fixture
def api(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Client]:
    """The HTTP intake on the test's ledger, logged in to its pages."""
    configured = settings_for(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path,
        API_TOKEN=TOKEN,
        session_cookie_secure="false",
    )
    app = create_app(configured)
    client = Client(app)
    login = client.request("POST", "/login", data={"token": TOKEN, "next": "/"})
    assert login.status_code == 303, login.text
    yield client
    client.close()
    app.state.intake.runtime.close()


def run(task: Any, *args: Any) -> Any:
    return task.apply(args=args, throw=True).get()


def test_calls_show_in_the_read_api_pages_metrics_and_audit(
    sandbox: str, ledger_engine: sa.Engine, api: Client, postgres_url: str, tmp_path: Path
) -> None:
    # Given a charge recorded, and the same key called with other arguments (dead-lettered)
    run(shop.charge, {"order_id": "o-1", "customer_id": "c-1", "amount": 100})
    with pytest.raises(CallDeadLettered):
        run(shop.charge, {"order_id": "o-1", "customer_id": "c-1", "amount": 900})
    done, refused = sorted(
        JobStore(engine=ledger_engine).list_jobs(pipeline="task:shop.charge"),
        key=lambda job: job.state != "succeeded",
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    # Then the read API has each call as a job of one step, `call`, under its key
    job = api.request("GET", f"/jobs/{done.id}", headers=bearer).json()
    assert (job["pipeline"], job["state"]) == ("task:shop.charge", "succeeded")
    assert [(s["name"], s["key"], s["state"]) for s in job["steps"]] == [
        ("call", "charge:o-1", "succeeded")
    ]
    [letter] = api.request("GET", "/dead-letters", headers=bearer).json()["dead_letters"]
    assert (letter["job_id"], letter["reason"]) == (str(refused.id), "fingerprint_mismatch")
    # the pages show them, and refuse to replay a key reused for other arguments
    page = api.request("GET", f"/ui/jobs/{done.id}")
    assert page.status_code == 200, page.text
    assert "charge:o-1" in page.text
    shown = api.request("GET", f"/ui/dead-letters/{letter['id']}")
    assert shown.status_code == 200, shown.text
    assert "forced replay" not in shown.text  # its key is not unknown
    plan = api.request("GET", f"/ui/dead-letters/{letter['id']}/plan")
    assert plan.status_code == 200, plan.text
    assert "different request" in plan.text
    # the metrics count them
    metrics = api.request("GET", "/metrics", headers=bearer).text
    assert 'oncelery_jobs{state="succeeded"} 1.0' in metrics
    assert 'oncelery_jobs{state="dead_lettered"} 1.0' in metrics
    # and the audit matches the charge to its key
    report, _ = run_audit(
        settings_for(
            database_url=postgres_url, broker_url=None, data_dir=tmp_path, PROVIDER_URL=sandbox
        )
    )
    assert (report.clean, dict(report.effects), report.ledger_entries) == (
        True,
        {"charge": 1},
        1,
    )
