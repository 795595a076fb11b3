"""What the tests of decorated tasks share: the shop app on the test's Redis, and this
process's runtime of calls (what the publish hook writes to) on the test's ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from jobs.engine.runtime import Runtime
from jobs.tasks.running import close_runtime
from tests.shop_app import shop_on


@pytest.fixture
def shop_app(redis_url: str) -> Iterator[Celery]:
    """The shop's app, sending to the test's Redis (its queue purged before and after)."""
    with shop_on(redis_url) as app:
        yield app


@pytest.fixture
def calls_ledger(
    runtime: Runtime, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """`runtime`, with this process's calls (the publish hook, `Task.apply`) on its ledger."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path / "data"))
    yield runtime
    close_runtime()
