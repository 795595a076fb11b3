"""Publishing many task messages at once (the first steps of enqueued jobs, the next steps of a
batch in the chained mode), on a connection each process keeps for it: on RabbitMQ the
publisher confirms of the lot are awaited together, not one by one."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from celery import Celery, Task
from celery.signals import worker_process_shutdown
from kombu import Connection, Producer
from kombu.utils.uuid import uuid

from config import MAIN_QUEUE, RETRY_QUEUE, Settings, get_settings
from jobs.engine.dispatch import ITEMS_PER_MESSAGE, READING_HEADER, reading_header
from jobs.engine.runtime import step_time_limit
from jobs.engine.step_messages import item_task_name, task_name
from jobs.errors import UnknownPipeline
from jobs.maps import is_map
from jobs.pipelines import MAX_TIME_LIMIT, Pipeline, Step, registry
from jobs.worker.app import app
from jobs.worker.redis_broker import lend_one_client
from jobs.worker.time_limits import FAN_OUT_ALLOWANCE
from ledger import Reading

logger = logging.getLogger(__name__)

#: Seconds to wait for RabbitMQ to confirm a batch before calling the rest unsent.
CONFIRM_TIMEOUT: Final = 30.0
#: Redis commands sent in one pipeline (a message is one, or two with its `task-sent` event).
_REDIS_BATCH: Final = 1000

_PUBLISHERS: weakref.WeakKeyDictionary[Celery, Publisher] = weakref.WeakKeyDictionary()
_PUBLISHERS_LOCK = threading.Lock()


def publisher_for(app: Celery) -> Publisher:
    """The batch publisher of an app in this process."""
    with _PUBLISHERS_LOCK:
        found = _PUBLISHERS.get(app)
        if found is None:
            found = _PUBLISHERS[app] = Publisher(app)
        return found


@worker_process_shutdown.connect
def close_publishers(**_: Any) -> None:
    """Close this process's publishing connections (a worker child shutting down)."""
    with _PUBLISHERS_LOCK:
        publishers = list(_PUBLISHERS.values())
    for publisher in publishers:
        publisher.close()


class Publisher:
    """A connection of its own, opened on first use and kept, that publishes messages in
    batches. Thread-safe; after a fork the child opens its own (the parent's is left alone:
    closing it would close the parent's session too).

    Args:
        app: the app whose broker and message settings are used.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._confirms: Confirms | None = None

    def publish(self, job_ids: Sequence[str], send: Callable[[str, Producer], None]) -> list[str]:
        """Call `send(job_id, producer)` for each job, then wait for the broker's confirms.

        A message counts as sent only once the broker confirmed it; whatever is not confirmed
        is reported unsent, to go back to the outbox or wait for the sweeper (a second copy of
        a message that was in fact queued is absorbed by the ledger).

        Returns:
            The jobs whose messages were not all confirmed (all of them if the broker could
            not be reached).
        """
        with self._lock:
            try:
                return self._publish(job_ids, send)
            except Exception as exc:  # noqa: BLE001 - whatever the broker said, these are unsent
                logger.warning("publishing %d messages failed: %s", len(job_ids), exc)
                self._drop()
                return list(job_ids)

    def close(self) -> None:
        """Close the connection, if this process opened it."""
        with self._lock:
            self._drop()

    def _publish(self, job_ids: Sequence[str], send: Callable[[str, Producer], None]) -> list[str]:
        connection, producer, confirms = self._open()
        if confirms is not None:
            confirms.begin()
        # On Redis, kombu's publish batch (`Producer.batch`, kombu 5.7 on) sends the lot's
        # commands in pipelines of up to `_REDIS_BATCH`, a round trip each instead of one a
        # message; it raises if one fails (then all count unsent). Other transports, and
        # older kombus, publish at once.
        batch: Any = getattr(producer, "batch", None)
        with batch(max_size=_REDIS_BATCH) if batch is not None else contextlib.nullcontext():
            for job_id in job_ids:
                if confirms is not None:
                    confirms.sending = job_id
                send(job_id, producer)
        if confirms is None:
            return []
        confirms.wait(connection, timeout=CONFIRM_TIMEOUT)
        unconfirmed = confirms.unconfirmed()
        if confirms.waiting():
            # Answers still owed would be counted against the next batch: start afresh.
            self._drop()
        return [job_id for job_id in job_ids if job_id in unconfirmed]

    def _open(self) -> tuple[Connection, Producer, Confirms | None]:
        if self._pid != os.getpid():
            # Inherited from the parent: forget it without closing it.
            self._connection, self._producer, self._confirms = None, None, None
            self._pid = os.getpid()
        if self._connection is None or self._producer is None:
            # Publisher confirms are switched on by hand (`Confirms`), to await them together.
            connection = self.app.connection_for_write(transport_options={"confirm_publish": False})
            try:
                channel = connection.default_channel
                lend_one_client(channel)
                self._confirms = Confirms.select(channel)
                self._producer = self.app.amqp.Producer(channel)
            except Exception:
                connection.release()
                raise
            self._connection = connection
        return self._connection, self._producer, self._confirms

    def _drop(self) -> None:
        connection = self._connection
        self._connection, self._producer, self._confirms = None, None, None
        if connection is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                connection.release()


class Confirms:
    """RabbitMQ's publisher confirms on one channel, collected as they come.

    The broker numbers a confirm-mode channel's messages 1, 2, 3…; each number is noted with
    the job being sent when it was published (a job may publish more than its task message,
    e.g. a `task-sent` event), and a job is confirmed when all of its messages are acked.
    """

    def __init__(self) -> None:
        #: The job whose messages are being published now.
        self.sending = ""
        #: The numbers published in this round, and whose they are.
        self.sent_by: dict[int, str] = {}
        self.acked: set[int] = set()
        self.nacked: set[int] = set()
        #: Messages published on the channel so far.
        self.published = 0
        #: Every number up to this one has an answer.
        self._floor = 0

    @classmethod
    def select(cls, channel: Any) -> Confirms | None:
        """Put a py-amqp channel in confirm mode and number what it publishes; None on a
        broker without confirms."""
        if not hasattr(channel, "confirm_select"):
            return None
        confirms = cls()
        channel.confirm_select()
        channel.events["basic_ack"].add(confirms._on_ack)
        channel.events["basic_nack"].add(confirms._on_nack)
        publish = channel.basic_publish

        def numbered(*args: Any, **kwargs: Any) -> Any:
            confirms.published += 1
            confirms.sent_by[confirms.published] = confirms.sending
            return publish(*args, **kwargs)

        channel.basic_publish = numbered
        return confirms

    def begin(self) -> None:
        """Start a round: forget the last one's messages (all of which were answered)."""
        self.sent_by.clear()
        self.acked.clear()
        self.nacked.clear()

    def wait(self, conn: Any, *, timeout: float) -> None:
        """Read the broker's answers until every message published has one, or `timeout`
        seconds pass."""
        deadline = time.monotonic() + timeout
        while self.waiting():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=left)

    def waiting(self) -> bool:
        """Whether a message published has no answer yet."""
        return self._floor < self.published

    def unconfirmed(self) -> set[str]:
        """The jobs with a message the broker did not ack (nacked, or no answer yet)."""
        return {job for tag, job in self.sent_by.items() if tag not in self.acked}

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._answer(self.acked, tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._answer(self.nacked, tag, multiple)

    def _answer(self, into: set[int], tag: int, multiple: bool) -> None:
        # `multiple`: this number and every earlier one not answered yet.
        first = self._floor + 1 if multiple else tag
        into.update(t for t in range(first, tag + 1) if not self._answered(t))
        while self._answered(self._floor + 1):
            self._floor += 1

    def _answered(self, tag: int) -> bool:
        return tag in self.acked or tag in self.nacked


#: Seconds between a step's soft time limit (an exception it can handle) and the hard one.
_HARD_LIMIT_GRACE: Final = 5


class CeleryDispatch:
    """Hands jobs on through Celery: next steps on the main queue; retries, replays and
    re-drives on the retry queue. Each message carries its step's time limits.

    Args:
        task: the running task, for `retry_later` (None when only sending, e.g. enqueueing).
        sender: the app that publishes; the worker's own app by default.
        settings: where per-step time limits come from; the app's settings by default.
    """

    def __init__(
        self,
        task: Task[Any, Any] | None = None,
        *,
        sender: Celery | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.task = task
        self.sender = sender or app
        self.settings = settings

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        """Publish a step of a job (`resend`: again, on the retry queue; `countdown`: not
        before that many seconds)."""
        # Whole seconds: Celery's message format and its stubs take integers.
        soft = math.ceil(self._message_limit(pipeline, step))
        self.sender.send_task(
            task_name(pipeline, step),
            args=[job_id],
            queue=RETRY_QUEUE if resend else MAIN_QUEUE,
            countdown=countdown,
            soft_time_limit=soft,
            time_limit=soft + _HARD_LIMIT_GRACE,
        )

    def send_many(
        self,
        pipeline: str,
        step: str,
        job_ids: Sequence[str],
        *,
        readings: Mapping[str, Reading] | None = None,
    ) -> list[str]:
        """Publish the same step of many jobs on the main queue, on this process's publishing
        connection; on RabbitMQ the publisher confirms are awaited once for the lot. A job
        with a reading (by job id) carries it in its message (`READING_HEADER`).

        Returns the job ids whose publish is not confirmed (all of them when the broker
        cannot be reached): they may or may not be queued, so they go back to the outbox
        (or wait for the sweeper) and a second copy, if any, is absorbed by the ledger.
        """
        soft = math.ceil(self._message_limit(pipeline, step))
        name = task_name(pipeline, step)
        readings = readings or {}

        amqp, sent_events = self.sender.amqp, self.sender.conf.task_send_sent_event

        def send(job_id: str, producer: Producer) -> None:
            reading = readings.get(job_id)
            header = reading_header(reading) if reading is not None else None
            # Celery's own message, built and sent by the two calls `send_task` makes, minus
            # what it does around them that these messages never need (routing rules, the
            # task's registered options, a result handle, a parent task: they are sent by a
            # producer or a batch, never from inside a task): a third of the publish's CPU.
            task_id = uuid()
            message = amqp.create_task_message(
                task_id,
                name,
                [job_id],
                {},
                time_limit=soft + _HARD_LIMIT_GRACE,
                soft_time_limit=soft,
                create_sent_event=sent_events,
                reply_to=self.sender.thread_oid,
                ignore_result=None,  # as `send_task` leaves it: the task's own setting rules
            )
            amqp.send_task_message(
                producer,
                name,
                message,
                queue=MAIN_QUEUE,
                headers={READING_HEADER: header} if header is not None else None,
                # A reconnect would publish on a fresh channel, without the confirms awaited
                # here: a failed publish is reported unsent instead.
                retry=False,
            )

        return publisher_for(self.sender).publish(job_ids, send)

    def send_items(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        item_ids: Sequence[str],
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> list[str]:
        """Publish items of a job's map step, `ITEMS_PER_MESSAGE` to a message, on this
        process's publishing connection (on RabbitMQ the confirms of the lot awaited once);
        `resend`: on the retry queue. Returns the item ids not confirmed: they stay in the
        outbox for the sweeper, and a second copy, if any, is absorbed by the ledger."""
        chunks = {
            str(start): list(item_ids[start : start + ITEMS_PER_MESSAGE])
            for start in range(0, len(item_ids), ITEMS_PER_MESSAGE)
        }
        # Each item is bounded by its own limit as it acts; the message's bounds them all.
        each = self._time_limit(pipeline, step)
        name = item_task_name(pipeline, step)
        amqp, sent_events = self.sender.amqp, self.sender.conf.task_send_sent_event

        def send(chunk: str, producer: Producer) -> None:
            items = chunks[chunk]
            soft = math.ceil(min(each * len(items), MAX_TIME_LIMIT))
            message = amqp.create_task_message(
                uuid(),
                name,
                [job_id, items],
                {},
                countdown=countdown,
                time_limit=soft + _HARD_LIMIT_GRACE,
                soft_time_limit=soft,
                create_sent_event=sent_events,
                reply_to=self.sender.thread_oid,
                ignore_result=None,
            )
            queue = RETRY_QUEUE if resend else MAIN_QUEUE
            amqp.send_task_message(producer, name, message, queue=queue, retry=False)

        unsent = publisher_for(self.sender).publish(list(chunks), send)
        return [item_id for chunk in unsent for item_id in chunks[chunk]]

    def retry_later(self, delay: float) -> NoReturn:
        """Publish the running task again on the retry queue after `delay` seconds."""
        assert self.task is not None
        raise self.task.retry(countdown=delay, queue=RETRY_QUEUE)

    def _message_limit(self, pipeline: str, step: str) -> float:
        """Seconds a step's own message may take: its steps' limits, and a map step's
        fan-out among them (its record and publish grow with its items; its run has its
        own alarm)."""
        running = self._running(pipeline, step)
        fans_out = running is not None and any(is_map(each) for each in running[1])
        return self._time_limit(pipeline, step) + (FAN_OUT_ALLOWANCE if fans_out else 0.0)

    def _time_limit(self, pipeline: str, step: str) -> float:
        settings = self.settings or get_settings()
        running = self._running(pipeline, step)
        if running is None:
            return settings.step_time_limit
        declared, steps = running
        return sum(step_time_limit(settings, declared, each.name) for each in steps)

    def _running(
        self, pipeline: str, step: str
    ) -> tuple[Pipeline[object], list[Step[object]]] | None:
        """The steps one message of `step` runs (None: a pipeline or step not declared)."""
        settings = self.settings or get_settings()
        try:
            declared = registry.get(pipeline)
        except UnknownPipeline:
            return None
        names = [each.name for each in declared.steps]
        if step not in names:
            return None
        # On the fast path one task runs this step and every step after it.
        start = names.index(step)
        end = len(names) if settings.fast_path else start + 1
        return declared, list(declared.steps[start:end])
