"""`step_timer_for`: which steps of a message get an alarm of their own. A map step's does in
either mode: its message allows for the fan-out after its run, so the message's Celery limit
no longer bounds the run itself."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from config import Settings
from jobs.places import places_crawl
from jobs.worker.time_limits import step_timer, step_timer_for


@pytest.mark.parametrize("fast_path", [False, True])
def test_a_map_steps_run_has_an_alarm_in_either_mode(tmp_path: Path, fast_path: bool) -> None:
    settings = Settings.model_validate({"ONCELERY_DATA_DIR": str(tmp_path), "fast_path": fast_path})
    assert step_timer_for(settings, places_crawl.step("search")) is step_timer
    plain = step_timer_for(settings, places_crawl.step("plan"))
    assert plain is (step_timer if fast_path else None)


def test_no_alarm_off_the_main_thread(tmp_path: Path) -> None:
    settings = Settings.model_validate({"ONCELERY_DATA_DIR": str(tmp_path)})
    found: list[object] = []
    thread = threading.Thread(
        target=lambda: found.append(step_timer_for(settings, places_crawl.step("search")))
    )
    thread.start()
    thread.join()
    assert found == [None]
