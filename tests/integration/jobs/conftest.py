"""What the runner's and the sweeper's tests share: a dispatch that records what would be
published, and a runtime on the test's ledger."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa

from jobs.retry import RetryPolicy
from jobs.runtime import Runtime
from ledger import JobStore, StepLedger
from tests.conftest import settings_for


class RetryRequested(Exception):
    def __init__(self, delay: float) -> None:
        self.delay = delay


@dataclass
class RecordingDispatch:
    sent: list[tuple[str, str, str]] = field(default_factory=list)

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        self.sent.append((pipeline, step, job_id))

    def retry_later(self, delay: float) -> NoReturn:
        raise RetryRequested(delay)


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
