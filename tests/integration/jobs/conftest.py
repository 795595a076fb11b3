"""What the runner's and the sweeper's tests share: a runtime on the test's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.engine.runtime import Runtime
from jobs.retry import RetryPolicy
from ledger import JobStore, StepLedger
from tests.conftest import settings_for


@pytest.fixture
def runtime(engine: sa.Engine, database_url: str, tmp_path: Path) -> Runtime:
    settings = settings_for(database_url=database_url, broker_url=None, data_dir=tmp_path)
    return Runtime(
        settings=settings,
        engine=engine,
        ledger=StepLedger(engine=engine, lease_seconds=30),
        store=JobStore(engine=engine),
        retry_policy=RetryPolicy(max_attempts=3, backoff_base=0.1, backoff_max=1.0),
    )


@pytest.fixture
def fast(runtime: Runtime, database_url: str, tmp_path: Path) -> Runtime:
    """The runtime with the fast path on."""
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, fast_path=True
    )
    return runtime
