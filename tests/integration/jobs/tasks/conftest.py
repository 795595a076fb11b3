"""What the tests of decorated tasks share: the shop app on the test's Redis, this process's
runtime of calls (what the publish hook and `Task.apply` write to) on the test's ledger, and
a sandbox process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from jobs.engine.runtime import Runtime
from jobs.tasks.running import close_runtime
from jobs.tools import processes, shop
from ledger import create_engine, upgrade
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


@pytest.fixture
def ledger_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(postgres_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sandbox(
    postgres_url: str,
    ledger_engine: sa.Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """A sandbox process, and this process's settings on the test's ledger."""
    del ledger_engine
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    argv = processes.sandbox_argv(port, db_path=tmp_path / "sandbox.sqlite3", options=[])
    process = processes.start("sandbox", argv, env=dict(os.environ), log_dir=tmp_path)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    monkeypatch.setenv("PROVIDER_URL", url)
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path / "data"))
    try:
        processes.wait_until_answers(f"{url}/healthz", process=process)
        yield url
    finally:
        close_runtime()
        shop.close_clients()
        processes.stop_all([process])
