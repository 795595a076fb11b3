"""`jobs.ops.health.Probe`: a check that fails or hangs makes the dependency unavailable within the
deadline, with the detail logged rather than answered; a hung check is not started twice."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from jobs.ops.health import OK, UNAVAILABLE, Probe


def test_a_check_that_returns_is_ok() -> None:
    assert asyncio.run(Probe("database", lambda: None, deadline=5).status()) == OK


def test_a_failing_check_is_unavailable_and_its_error_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse() -> None:
        raise ConnectionError("connection to db.internal:5432 refused")

    with caplog.at_level(logging.WARNING):
        state = asyncio.run(Probe("database", refuse, deadline=5).status())

    assert state == UNAVAILABLE
    assert "db.internal:5432 refused" in caplog.text


def test_a_hung_check_is_unavailable_and_not_started_again_while_it_hangs() -> None:
    release, calls = threading.Event(), []

    def hang() -> None:
        calls.append(1)
        release.wait(30)

    probe = Probe("database", hang, deadline=0.2)
    try:
        assert asyncio.run(probe.status()) == UNAVAILABLE
        assert asyncio.run(probe.status()) == UNAVAILABLE
        assert len(calls) == 1
    finally:
        release.set()
