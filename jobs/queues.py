"""What the broker holds: the depth of oncelery's queues, and whether it answers at all."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config import DEAD_QUEUE, MAIN_QUEUE, RETRY_QUEUE

#: Seconds to wait for the broker before calling it unreachable.
_TIMEOUT = 3


def queue_depths(app: Celery) -> dict[str, int | None]:
    """Messages waiting in each queue (None when it cannot be read, e.g. the broker is down;
    0 for a queue nobody declared yet)."""
    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=_TIMEOUT)
            for name in (MAIN_QUEUE, RETRY_QUEUE, DEAD_QUEUE):
                # A fresh channel each time: RabbitMQ closes the channel of a failed passive
                # declare (a queue nobody declared yet).
                try:
                    declared = Queue(name, channel=conn.channel()).queue_declare(passive=True)
                except conn.channel_errors:
                    depths[name] = 0
                    continue
                # py-amqp and kombu's virtual transports answer (queue, messages, consumers).
                depths[name] = int(declared[1]) if isinstance(declared, tuple) else None
    except Exception:  # noqa: BLE001 - whatever the transport raises, the depth is unknown
        return dict.fromkeys((MAIN_QUEUE, RETRY_QUEUE, DEAD_QUEUE))
    return depths


def queued_steps(app: Celery) -> int | None:
    """Step messages waiting for a worker (main and retry queues), None when unknown."""
    depths = queue_depths(app)
    main, retry = depths[MAIN_QUEUE], depths[RETRY_QUEUE]
    return None if main is None or retry is None else main + retry


def broker_reachable(app: Celery) -> str:
    """ "ok", or what went wrong connecting to the broker."""
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"
