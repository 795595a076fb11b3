"""`jobs.worker.app`: the Celery configuration it loads declares oncelery's two queues."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Queue

from config import MAIN_QUEUE, RETRY_QUEUE
from jobs.engine.step_messages import task_name
from jobs.worker.app import _configure
from jobs.worker.steps import is_repeat


def test_configuration_declares_the_main_and_retry_queues(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONCELERY_DATA_DIR", str(tmp_path))

    config = _configure()

    queues = config["task_queues"]
    assert isinstance(queues, list)
    assert all(isinstance(queue, Queue) for queue in queues)
    assert [queue.name for queue in queues] == [MAIN_QUEUE, RETRY_QUEUE]
    assert config["task_acks_late"] is True
    # The embedded broker's folders exist before a worker polls them.
    assert (tmp_path / "broker" / "queue").is_dir()
    assert (tmp_path / "broker" / "control").is_dir()


def test_task_names_carry_pipeline_and_step() -> None:
    assert task_name("order-placed", "act") == "oncelery.order-placed.act"


def test_a_message_repeats_an_attempt_when_redelivered_or_sent_again() -> None:
    assert not is_repeat({"routing_key": "oncelery", "redelivered": False})
    assert is_repeat({"routing_key": "oncelery", "redelivered": True})
    assert is_repeat({"routing_key": "oncelery.retry"})
