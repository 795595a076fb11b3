"""`serve()` wiring (uvicorn is stubbed: no socket), the package's public names and its imports."""

from __future__ import annotations

import ast
import signal
from pathlib import Path
from types import FrameType

import pytest
import uvicorn
from fastapi import FastAPI

import jobs.sandbox
from jobs.sandbox import SERVICES, Faults, serve
from jobs.sandbox.state import SandboxState

PACKAGE_DIR = Path(jobs.sandbox.__file__).parent
FORBIDDEN_IMPORTS = {"jobs", "config", "ledger", "celery", "kombu"}


def test_public_names() -> None:
    assert set(jobs.sandbox.__all__) == {
        "create_app",
        "serve",
        "Faults",
        "SandboxStore",
        "SERVICES",
        "unit_amount",
    }
    assert SERVICES == (
        "customers",
        "prices",
        "payments",
        "notifications",
        "places",
        "datasets",
    )


def test_package_imports_nothing_outside_itself() -> None:
    absolute: set[str] = set()
    for source in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                absolute.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                absolute.add(node.module.split(".")[0])

    assert absolute & FORBIDDEN_IMPORTS == set()


def test_serve_runs_uvicorn_quietly_and_returns_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stub server that, like uvicorn after a graceful shutdown, re-raises SIGTERM,
    # and an outer SIGTERM handler standing in for the default one (which would kill pytest)
    configs: list[uvicorn.Config] = []
    outer_calls: list[int] = []

    def fake_run(server: uvicorn.Server, sockets: object = None) -> None:
        configs.append(server.config)
        signal.raise_signal(signal.SIGTERM)

    def outer(signum: int, frame: FrameType | None) -> None:
        outer_calls.append(signum)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    previous = signal.signal(signal.SIGTERM, outer)
    try:
        # When the sandbox is served
        serve(
            "127.0.0.1",
            8799,
            tmp_path / "data" / "sandbox.sqlite3",
            Faults(fault_rate=0.5),
            False,
            2.0,
        )
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    # Then uvicorn got the app and quiet settings, serve absorbed the signal and restored handlers
    [config] = configs
    assert (config.host, config.port, config.log_level, config.access_log) == (
        "127.0.0.1",
        8799,
        "warning",
        False,
    )
    assert isinstance(config.app, FastAPI)
    state = config.app.state.sandbox
    assert isinstance(state, SandboxState)
    assert (state.honour_keys, state.hang_seconds) == (False, 2.0)
    assert state.plan.global_faults == Faults(fault_rate=0.5)
    assert outer_calls == []
    assert restored is outer
    # And the store was created where asked
    assert (tmp_path / "data" / "sandbox.sqlite3").is_file()
