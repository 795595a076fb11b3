"""What the broker holds: the depth of oncelery's queues, whether it answers at all, whether
it lost what it held (`broker_watch`), and the RabbitMQ dead-letter queue's copies (declared
bounded, removed when their dead letters are purged)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from celery import Celery
from kombu import Connection, Queue
from kombu.message import Message

from config import DEAD_QUEUE, MAIN_QUEUE, RETRY_QUEUE, dead_letter_queue
from jobs.engine.step_messages import task_name
from jobs.engine.sweeper import BlindWatch, BrokerWatch, QueueLoss
from ledger import DeadLetter

logger = logging.getLogger(__name__)

#: Seconds to wait for the broker before calling it unreachable.
_TIMEOUT = 3
#: AMQP's reply code for a queue redeclared with other arguments.
_PRECONDITION_FAILED: Final = 406
#: Where the sweeper notes, in Redis itself, the server it saw last: "<run id> <Redis time>".
SEEN_KEY: Final = "oncelery:sweeper:seen"


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


def broker_watch(app: Celery) -> BrokerWatch:
    """How the sweeper learns that the broker lost its queues: on Redis, `RedisWatch`.

    RabbitMQ cannot tell over AMQP: it has no server identity or start time to compare, and
    a queue deleted (or purged) and declared again looks exactly like a drained one — an
    empty queue while jobs wait is also what messages held in the workers' prefetch look
    like. Our queues are durable, their messages persistent and publishes confirmed, so a
    restart keeps them; what an operator deletes is found by the stall threshold."""
    if str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        return RedisWatch(app)
    return BlindWatch()


class RedisWatch:
    """A Redis that restarted without the data it held (no persistence) has lost every queued
    message; one that kept it (RDB, AOF, a replica promoted) lost those sent after its last
    save. The sweeper keeps a note in Redis itself (`SEEN_KEY`): its server's run id and
    Redis's clock at each sweep. A missing note is a Redis that lost everything: every
    message sent before it started (`uptime_in_seconds` ago) is gone. A note with another
    run id is a restart that kept the data as of that note at the latest: messages sent
    between the note and the restart may be gone. Times are Redis's durations, compared
    with Postgres's clock only as "seconds ago", so the two clocks need not agree.

    A note written by another server that was up all along is a replica promoted (a
    failover): what was sent after the note may not have reached it.

    Not detected: a `FLUSHDB` without a restart (its moment is unknown; the stall threshold
    finds those jobs), messages evicted under `maxmemory`.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.run_id: str | None = None

    def lost(self) -> QueueLoss | None:
        """The messages lost since the note was written, if any (None when Redis does not
        answer: the next sweep asks again)."""
        try:
            with self.app.connection_for_read() as conn:
                client: Any = conn.default_channel.client  # type: ignore[attr-defined]
                server, persistence = client.info("server"), client.info("persistence")
                now, note = _redis_time(client), client.get(SEEN_KEY)
        except Exception as exc:  # noqa: BLE001 - whatever the transport raises: not known
            logger.warning("cannot read Redis's identity: %s", exc, extra={"action": "watch"})
            return None
        self.run_id = str(server["run_id"])
        uptime = float(server["uptime_in_seconds"])
        if note is None:
            saving = "AOF" if persistence.get("aof_enabled") else "no AOF"
            return QueueLoss(
                before=uptime,
                after=None,
                reason=f"Redis up {uptime:.0f}s ({saving}) has no note of an earlier sweep",
            )
        noted_run, _, noted_at = note.decode().partition(" ")
        if noted_run == self.run_id:
            return None
        since_note = now - float(noted_at)
        if uptime < since_note:
            # Restarted from a save holding the note: what came between it and the start.
            return QueueLoss(
                before=uptime,
                after=since_note,
                reason=f"Redis restarted {uptime:.0f}s ago with its data of {since_note:.0f}s ago",
            )
        # Up since before the note, yet another server wrote it: a replica promoted, which
        # may lack what its master took after the note.
        return QueueLoss(
            before=0.0, after=since_note, reason=f"another Redis server since {since_note:.0f}s"
        )

    def seen(self) -> None:
        """Write the note: this server, now."""
        if self.run_id is None:
            return
        try:
            with self.app.connection_for_read() as conn:
                client: Any = conn.default_channel.client  # type: ignore[attr-defined]
                client.set(SEEN_KEY, f"{self.run_id} {_redis_time(client)!r}")
        except Exception as exc:  # noqa: BLE001 - the next sweep writes it
            logger.warning("cannot write the sweeper's note: %s", exc, extra={"action": "watch"})


def _redis_time(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6
