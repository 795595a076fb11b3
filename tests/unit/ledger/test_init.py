"""The ledger stands alone: importing and using it in a fresh interpreter brings in no celery,
kombu, jobs or config (STYLE.md, "The ledger / jobs boundary")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ledger

REPO_ROOT = Path(__file__).resolve().parents[3]

#: Packages the ledger must never import.
FORBIDDEN = ("celery", "kombu", "billiard", "jobs", "config")

_REPORT = f"""
import json, sys
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & {set(FORBIDDEN)!r})))
"""


def _run(script: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", script + _REPORT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(imported, list)
    return [str(name) for name in imported]


def test_importing_the_ledger_imports_no_celery_jobs_or_config() -> None:
    assert _run("import ledger") == []


def test_migrating_and_using_the_ledger_imports_no_celery_jobs_or_config(tmp_path: Path) -> None:
    script = f"""
import uuid
import ledger
engine = ledger.create_engine({f"sqlite:///{tmp_path / 'ledger.sqlite3'}"!r})
ledger.upgrade(engine)
store = ledger.JobStore(engine=engine)
job = ledger.NewJob(pipeline="p", event_id="e", context={{"x": 1}}, fingerprint="f" * 64,
                    step_keys={{"s": "k:s"}}, first_step="s")
[(job_id, created)] = store.create_jobs([job])
claim = ledger.StepLedger(engine=engine, lease_seconds=30).claim_step(job_id, "s")
assert created and isinstance(claim, ledger.Claim), claim
"""
    assert _run(script) == []


def test_every_public_name_is_importable() -> None:
    assert all(hasattr(ledger, name) for name in ledger.__all__)
    assert "StepLedger" in ledger.__all__
    assert "JobStore" in ledger.__all__
