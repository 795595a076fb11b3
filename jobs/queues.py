"""What the broker holds: the depth of oncelery's queues, whether it answers at all, and the
RabbitMQ dead-letter queue's copies — declared bounded (replacing one an older version
declared unbounded), and removed when their dead letters are purged."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from celery import Celery
from kombu import Connection, Queue
from kombu.message import Message

from config import DEAD_QUEUE, MAIN_QUEUE, RETRY_QUEUE, dead_letter_queue
from jobs.step_messages import task_name
from ledger import DeadLetter

logger = logging.getLogger(__name__)

#: Seconds to wait for the broker before calling it unreachable.
_TIMEOUT = 3
#: AMQP's reply code for a queue redeclared with other arguments.
_PRECONDITION_FAILED: Final = 406


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


def declare_dead_letter_queue(app: Celery, *, queue: Queue | None = None) -> None:
    """Declare RabbitMQ's dead-letter queue, bounded (`config.dead_letter_queue`), and bind it
    to the dead-letter exchange. A queue of that name declared with other arguments (by a
    version that did not bound it) is replaced: RabbitMQ refuses to redeclare it otherwise,
    and its copies are only copies — Postgres keeps every dead letter.

    Args:
        queue: the declaration (the configured one by default; a smaller bound in tests).
    """
    wanted = queue or dead_letter_queue()
    with app.connection_for_write() as conn:
        try:
            wanted(conn.channel()).declare()
            return
        except conn.channel_errors as exc:
            if getattr(exc, "reply_code", None) != _PRECONDITION_FAILED:
                raise
        # Another worker replacing it at the same moment at worst drops the copies rejected
        # in between (milliseconds of them); both end with the bounded queue.
        dropped = _depth(conn, wanted.name) or 0
        Queue(wanted.name, channel=conn.channel()).delete()
        wanted(conn.channel()).declare()
    logger.warning(
        "replaced the dead-letter queue %s, declared without its bound, and its %s copies "
        "(every dead letter is in Postgres: oncelery dlq list)",
        wanted.name,
        dropped,
        extra={"action": "dead_queue_replaced", "dropped": dropped},
    )


def remove_dead_copies(app: Celery, letters: Sequence[DeadLetter] | None) -> int | None:
    """Remove from RabbitMQ's dead-letter queue the copies of purged dead letters.

    Args:
        letters: the purged dead letters; None removes every copy (those of messages that
            named no dead letter too).

    Returns:
        How many copies were removed (0 on other brokers: they keep none); None when the
        broker could not be reached (the copies then expire with the queue's TTL).
    """
    with app.connection_for_write() as unopened:
        if unopened.transport.driver_type != "amqp":
            return 0
    copies = (
        None
        if letters is None
        else {(task_name(letter.pipeline, letter.step), str(letter.job_id)) for letter in letters}
    )
    if copies is not None and not copies:
        return 0
    try:
        return _remove_copies(app, copies)
    except Exception as exc:  # noqa: BLE001 - reported as unknown: the dead letters are purged
        logger.warning("dead-letter copies not removed: %s: %s", type(exc).__name__, exc)
        return None


def _remove_copies(app: Celery, copies: set[tuple[str, str]] | None) -> int:
    declare_dead_letter_queue(app)  # bounded first: the scan below holds at most the bound
    with app.connection_for_write() as conn, conn.channel() as channel:
        queue = Queue(DEAD_QUEUE, channel=channel)
        if copies is None:
            return int(queue.purge() or 0)
        removed = 0
        # Every copy read stays unacknowledged until the channel closes, so that none is read
        # twice; those not removed then go back to their places in the queue.
        for _ in range(_depth(conn, DEAD_QUEUE) or 0):
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            if _copy_of(message) in copies:
                message.ack()
                removed += 1
    return removed


def _copy_of(message: Message) -> tuple[str, str] | None:
    """(task name, job id) of a step message's copy (Celery's message protocol 2: the task in
    the headers, the arguments first in the body); None for anything else."""
    try:
        task = message.headers["task"]
        args = message.decode()[0]
        return (str(task), str(args[0]))
    except Exception:  # noqa: BLE001 - a copy that is no step message matches no dead letter
        return None


def _depth(conn: Connection, name: str) -> int | None:
    try:
        declared = Queue(name, channel=conn.channel()).queue_declare(passive=True)
    except conn.channel_errors:
        return None
    return int(declared[1]) if isinstance(declared, tuple) else None
