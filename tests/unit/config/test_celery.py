"""`config.celery`: late acks, JSON only, the queues, and each broker family's options."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import (
    DEAD_QUEUE,
    DEAD_QUEUE_MAX_LENGTH,
    DEAD_QUEUE_TTL_MS,
    MAIN_QUEUE,
    RETRY_QUEUE,
    Settings,
    celery_config,
    dead_letter_queue,
    prepare_broker,
)


def _settings(data_dir: Path, **env: object) -> Settings:
    return Settings.model_validate({"ONCELERY_DATA_DIR": str(data_dir), **env})


def test_queue_names() -> None:
    assert MAIN_QUEUE == "oncelery"
    assert RETRY_QUEUE == "oncelery.retry"


@pytest.mark.parametrize(
    "broker_url", [None, "amqp://guest:guest@rabbit//", "redis://cache:6379/0"]
)
def test_every_broker_acks_late_and_speaks_json_only(
    tmp_path: Path, broker_url: str | None
) -> None:
    config = celery_config(_settings(tmp_path, BROKER_URL=broker_url))

    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["task_serializer"] == "json"
    assert config["result_serializer"] == "json"
    assert config["event_serializer"] == "json"
    assert config["accept_content"] == ["json"]
    assert config["result_backend"] is None
    assert config["task_ignore_result"] is True
    assert config["task_default_queue"] == MAIN_QUEUE
    assert config["task_create_missing_queues"] is True
    assert config["broker_connection_retry_on_startup"] is True
    assert config["timezone"] == "UTC"
    assert config["enable_utc"] is True
    assert config["worker_hijack_root_logger"] is False


def test_time_limits_follow_the_step_time_limit(tmp_path: Path) -> None:
    config = celery_config(_settings(tmp_path, step_time_limit=12.0))

    assert config["task_soft_time_limit"] == 12.0
    assert config["task_time_limit"] == 17.0


def test_embedded_broker_keeps_its_files_under_the_data_dir(tmp_path: Path) -> None:
    config = celery_config(_settings(tmp_path))

    broker = tmp_path.resolve() / "broker"
    assert config["broker_url"] == "filesystem://"
    assert config["broker_transport_options"] == {
        "data_folder_in": str(broker / "queue"),
        "data_folder_out": str(broker / "queue"),
        "control_folder": str(broker / "control"),
        "polling_interval": 0.05,
    }
    # No events and no remote control over a file transport.
    assert config["worker_send_task_events"] is False
    assert config["task_send_sent_event"] is False
    assert config["worker_enable_remote_control"] is False


@pytest.mark.parametrize(
    "broker_url", ["amqp://guest:guest@rabbit:5672//", "pyamqp://guest:guest@rabbit//"]
)
def test_amqp_confirms_publishes(tmp_path: Path, broker_url: str) -> None:
    config = celery_config(_settings(tmp_path, BROKER_URL=broker_url))

    assert config["broker_url"] == broker_url
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True
    assert config["worker_enable_remote_control"] is True


def test_redis_gets_no_transport_options(tmp_path: Path) -> None:
    config = celery_config(_settings(tmp_path, BROKER_URL="redis://cache:6379/0"))

    assert config["broker_transport_options"] == {}


def test_task_events_can_be_turned_off(tmp_path: Path) -> None:
    config = celery_config(
        _settings(tmp_path, BROKER_URL="amqp://guest:guest@rabbit//", task_events=False)
    )

    assert config["worker_send_task_events"] is False
    assert config["task_send_sent_event"] is False


def test_prepare_broker_creates_the_embedded_folders(tmp_path: Path) -> None:
    prepare_broker(_settings(tmp_path))

    assert sorted(path.name for path in (tmp_path / "broker").iterdir()) == ["control", "queue"]


def test_prepare_broker_creates_nothing_for_a_real_broker(tmp_path: Path) -> None:
    prepare_broker(_settings(tmp_path, BROKER_URL="amqp://guest:guest@rabbit//"))

    assert list(tmp_path.iterdir()) == []


def test_rabbitmq_queues_dead_letter_to_their_exchange(tmp_path: Path) -> None:
    from config.celery import DEAD_EXCHANGE, task_queues

    settings = Settings.model_validate(
        {"BROKER_URL": "amqp://guest:guest@localhost//", "ONCELERY_DATA_DIR": str(tmp_path)}
    )
    queues = task_queues(settings)
    assert [q.name for q in queues] == ["oncelery", "oncelery.retry"]
    assert all(q.queue_arguments == {"x-dead-letter-exchange": DEAD_EXCHANGE} for q in queues)
    redis = Settings.model_validate(
        {"BROKER_URL": "redis://localhost", "ONCELERY_DATA_DIR": str(tmp_path)}
    )
    assert all(q.queue_arguments is None for q in task_queues(redis))


def test_beat_sends_no_sweep_task(tmp_path: Path) -> None:
    # It sweeps in its own process (`jobs.worker.app._sweep_from_beat`), not through a worker pool.
    settings = Settings.model_validate({"ONCELERY_DATA_DIR": str(tmp_path), "sweep_interval": 7})
    assert celery_config(settings)["beat_schedule"] == {}


@pytest.mark.parametrize(
    ("broker_url", "batch_size", "prefetch"),
    [
        ("amqp://guest:guest@rabbit//", "16", 16),
        ("redis://cache:6379/0", "32", 32),
        ("amqp://guest:guest@rabbit//", "1", 4),
        (None, "16", 4),  # the embedded broker's workers take messages one by one
    ],
)
def test_workers_reserve_a_batch_per_child(
    tmp_path: Path, broker_url: str | None, batch_size: str, prefetch: int
) -> None:
    settings = _settings(tmp_path, BROKER_URL=broker_url, batch_size=batch_size)
    config = celery_config(settings)

    assert config["worker_prefetch_multiplier"] == prefetch
    assert config["oncelery_batch_size"] == int(batch_size)


def test_the_dead_letter_queue_is_bounded_in_count_bytes_and_age() -> None:
    queue = dead_letter_queue()

    assert queue.name == DEAD_QUEUE
    assert queue.durable
    # Nothing consumes it: past a bound RabbitMQ drops the oldest copies.
    assert queue.queue_arguments == {
        "x-max-length": DEAD_QUEUE_MAX_LENGTH,
        "x-max-length-bytes": 64 * 1024 * 1024,
        "x-message-ttl": DEAD_QUEUE_TTL_MS,
        "x-overflow": "drop-head",
    }
    assert DEAD_QUEUE_TTL_MS == 7 * 24 * 3600 * 1000
