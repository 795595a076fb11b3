"""The Celery configuration derived from `Settings`: queues, acknowledgement and broker options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from config.settings import Settings

if TYPE_CHECKING:
    from kombu import Queue

#: New orders: consumed by every worker.
MAIN_QUEUE: Final = "oncelery"
#: Retries and replays: their own queue, so a storm of failures cannot starve new orders.
RETRY_QUEUE: Final = "oncelery.retry"
#: RabbitMQ only: where a dead-lettered step's message goes (the Postgres row is the dead
#: letter people work with; this copy is for broker-side tooling). Nothing consumes it, so it
#: is bounded: the newest copies within these limits are kept, older ones dropped from its
#: head (see `dead_letter_queue`).
DEAD_EXCHANGE: Final = "oncelery.dlx"
DEAD_QUEUE: Final = "oncelery.dead"
#: The most copies the dead-letter queue keeps.
DEAD_QUEUE_MAX_LENGTH: Final = 10_000
#: The most bytes of message bodies it keeps (a step message's body is a job id: this bounds
#: forged or foreign ones).
DEAD_QUEUE_MAX_BYTES: Final = 64 * 1024 * 1024
#: How long it keeps a copy, in milliseconds: a week.
DEAD_QUEUE_TTL_MS: Final = 7 * 24 * 3600 * 1000
#: The task beat runs to re-drive stalled jobs.
SWEEP_TASK: Final = "oncelery.sweep"

#: The Celery setting (our own) that carries `Settings.batch_size` to the workers' strategy.
BATCH_SIZE_SETTING: Final = "oncelery_batch_size"
#: How often the embedded file broker looks for new messages, in seconds.
_FILESYSTEM_POLLING_INTERVAL: Final = 0.05
#: The name kombu knows the embedded broker's transport by: kombu's file transport, fixed to
#: write each message atomically, which `jobs.worker.embedded_broker` registers under it.
EMBEDDED_TRANSPORT: Final = "oncelery-files"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """Transport options for the configured broker family."""
    if settings.broker_kind == "filesystem":
        folder = settings.broker_dir
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "polling_interval": _FILESYSTEM_POLLING_INTERVAL,
        }
    if settings.broker_kind == "amqp":
        # Without confirms a publish into a restarting RabbitMQ can "succeed" and vanish.
        return {"confirm_publish": True}
    return {}


def prepare_broker(settings: Settings) -> None:
    """Create what the embedded broker needs on disk (its folders); other brokers need nothing."""
    if settings.broker_kind == "filesystem":
        for name in ("queue", "control"):
            (settings.broker_dir / name).mkdir(parents=True, exist_ok=True)


def task_queues(settings: Settings) -> list[Queue]:
    """The queues workers consume. Every app (worker, CLI, tests) declares them alike: RabbitMQ
    refuses a queue redeclared with other arguments."""
    # kombu is imported here, not at the top: the Celery-free engine reads `config` too.
    from kombu import Queue  # noqa: PLC0415

    arguments = {"x-dead-letter-exchange": DEAD_EXCHANGE} if settings.broker_kind == "amqp" else {}
    return [Queue(name, queue_arguments=arguments or None) for name in (MAIN_QUEUE, RETRY_QUEUE)]


def dead_letter_queue(*, max_length: int = DEAD_QUEUE_MAX_LENGTH) -> Queue:
    """The RabbitMQ queue that keeps copies of rejected messages (not consumed by workers),
    bounded in count, bytes and age; past a bound RabbitMQ drops the oldest copy (`drop-head`).
    Postgres keeps every dead letter: this queue is a courtesy copy, never the truth.

    Args:
        max_length: the most copies kept (smaller in tests).
    """
    arguments = {
        "x-max-length": max_length,
        "x-max-length-bytes": DEAD_QUEUE_MAX_BYTES,
        "x-message-ttl": DEAD_QUEUE_TTL_MS,
        "x-overflow": "drop-head",
    }
    from kombu import Exchange, Queue  # noqa: PLC0415 - as in `task_queues`

    exchange = Exchange(DEAD_EXCHANGE, type="fanout", durable=True)
    return Queue(DEAD_QUEUE, exchange, durable=True, queue_arguments=arguments)


def prefetch_multiplier(settings: Settings) -> int:
    """Messages a worker reserves per pool child: room for a full batch each (twice that is
    ~10 % faster, but a paused worker — GC, SIGSTOP — then sits on twice the re-drives and
    sweeps before the broker gives up on it). One message at a time (the embedded broker's
    workers never batch) needs only Celery's default 4."""
    if settings.broker_kind == "filesystem":
        return 4
    return max(4, settings.batch_size)


def celery_config(settings: Settings) -> dict[str, object]:
    """The Celery settings oncelery runs with (lower-case setting names)."""
    embedded = settings.broker_kind == "filesystem"
    hard_limit = settings.step_time_limit + 5.0
    return {
        "broker_url": settings.broker_url,
        "broker_transport": EMBEDDED_TRANSPORT if embedded else None,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        # Ack after the step is recorded; a killed child's message goes back to the broker.
        # The ledger absorbs the duplicates this causes and counts attempts so a poison
        # message cannot loop forever.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": prefetch_multiplier(settings),
        BATCH_SIZE_SETTING: settings.batch_size,
        "task_default_queue": MAIN_QUEUE,
        "task_queues": task_queues(settings),
        "task_create_missing_queues": True,
        "task_soft_time_limit": settings.step_time_limit,
        "task_time_limit": hard_limit,
        "worker_send_task_events": settings.task_events and not embedded,
        "task_send_sent_event": settings.task_events and not embedded,
        # The file transport has no broadcast between separate hosts worth having.
        "worker_enable_remote_control": not embedded,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        # Beat runs the sweeper in its own process (`jobs.worker.tasks`), not as a task: a sweep
        # queued behind the very messages it must re-drive, in pools busy with them, came too
        # late or expired unrun (22 of 71 in a chaos run on Redis).
        "beat_schedule": {},
    }
