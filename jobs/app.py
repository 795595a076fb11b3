"""The Celery app: one task per pipeline step (`oncelery.<pipeline>.<step>`), each running
`jobs.runner.run_step`, and the sweep task beat runs; the per-process runtime, rebuilt after
every fork."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from config import (
    MAIN_QUEUE,
    RETRY_QUEUE,
    SWEEP_TASK,
    Settings,
    celery_config,
    dead_letter_queue,
    get_settings,
    prepare_broker,
)
from jobs.enqueue import send_each
from jobs.errors import UnknownPipeline
from jobs.pipelines import Pipeline, registry
from jobs.queues import queued_steps
from jobs.runner import Outcome, run_step
from jobs.runtime import Runtime, load_pipelines
from jobs.sweeper import SweepReport, sweep
from ledger import DatabaseUnavailable

logger = logging.getLogger(__name__)

#: Seconds before a step is tried again when the database could not be reached at all.
_DATABASE_DOWN_DELAY = 5.0
#: Seconds before a step whose time limit struck while it was being recorded is sent again.
_LATE_LIMIT_DELAY = 1.0
#: Seconds between a step's soft time limit (an exception it can handle) and the hard one.
_HARD_LIMIT_GRACE = 5
#: Seconds `send_many` waits for RabbitMQ to confirm a batch before calling the rest unsent.
_CONFIRM_TIMEOUT = 30.0
#: Fewer jobs than this are sent one by one on the pooled connection: opening a connection
#: for the batch costs more than waiting for a few confirms.
_SMALLEST_BATCH = 8


def _configure() -> dict[str, object]:
    # Called by Celery when its configuration is first read: settings errors surface then,
    # not at import, so `oncelery` can report them as one line.
    settings = get_settings()
    # Beat keeps its schedule file there; the embedded broker and ledger live there too.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prepare_broker(settings)
    load_pipelines(settings)
    return celery_config(settings)


app = Celery("oncelery")
app.add_defaults(_configure)

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use and again after a fork."""
    global _runtime  # noqa: PLW0603 - one runtime per process, by design
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime.from_settings(get_settings())
    return _runtime


@worker_process_init.connect
def _fresh_runtime_in_child(**_: Any) -> None:
    # The parent may have opened connections before forking; the child must not reuse them
    # (DESIGN.md hazard 7). Dropping the reference is enough: `runtime()` builds a new one.
    global _runtime  # noqa: PLW0603
    _runtime = None


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    if _runtime is not None and _runtime.pid == os.getpid():
        _runtime.close()


@worker_ready.connect
def _declare_dead_letter_queue(**_: Any) -> None:
    # RabbitMQ drops a rejected message whose dead-letter exchange does not exist.
    if get_settings().broker_kind == "amqp":
        with app.connection_for_write() as conn:
            dead_letter_queue()(conn.default_channel).declare()


def task_name(pipeline: str, step: str) -> str:
    """The Celery task name of a pipeline's step."""
    return f"oncelery.{pipeline}.{step}"


def client_app(settings: Settings) -> Celery:
    """A Celery app that only sends, configured from `settings` rather than the environment
    (for a process that talks to several brokers, such as the test suite)."""
    prepare_broker(settings)
    client = Celery("oncelery-client", set_as_current=False)
    client.config_from_object(celery_config(settings))
    return client


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
        soft = math.ceil(self._time_limit(pipeline, step))
        self.sender.send_task(
            task_name(pipeline, step),
            args=[job_id],
            queue=RETRY_QUEUE if resend else MAIN_QUEUE,
            countdown=countdown,
            soft_time_limit=soft,
            time_limit=soft + _HARD_LIMIT_GRACE,
        )

    def send_many(self, pipeline: str, step: str, job_ids: Sequence[str]) -> list[str]:
        """Publish the same step of many jobs on the main queue, on one connection; on
        RabbitMQ the publisher confirms are awaited once for the lot, not one by one.

        Returns the job ids whose publish is not confirmed (all of them when the broker
        cannot be reached): they may or may not be queued, so they go back to the outbox
        and a second copy, if any, is absorbed by the ledger.
        """
        if len(job_ids) < _SMALLEST_BATCH:
            # A few jobs: one by one on the app's pooled connection, no connection to open.
            return send_each(self, pipeline, step, job_ids)
        soft = math.ceil(self._time_limit(pipeline, step))
        name = task_name(pipeline, step)
        # Publisher confirms are switched on by hand below, to await them together.
        options = {"confirm_publish": False}
        try:
            with self.sender.connection_for_write(transport_options=options) as conn:
                confirms = _Confirms.select(conn.default_channel)
                producer = self.sender.amqp.Producer(conn.default_channel)
                for job_id in job_ids:
                    if confirms is not None:
                        confirms.sending = job_id
                    self.sender.send_task(
                        name,
                        args=[job_id],
                        queue=MAIN_QUEUE,
                        soft_time_limit=soft,
                        time_limit=soft + _HARD_LIMIT_GRACE,
                        producer=producer,
                    )
                if confirms is None:
                    return []
                confirms.wait(conn, timeout=_CONFIRM_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the broker said, these are unsent
            logger.warning("publishing %d jobs failed: %s", len(job_ids), exc)
            return list(job_ids)
        unconfirmed = confirms.unconfirmed()
        return [job_id for job_id in job_ids if job_id in unconfirmed]

    def retry_later(self, delay: float) -> NoReturn:
        """Publish the running task again on the retry queue after `delay` seconds."""
        assert self.task is not None
        raise self.task.retry(countdown=delay, queue=RETRY_QUEUE)

    def _time_limit(self, pipeline: str, step: str) -> float:
        settings = self.settings or get_settings()
        try:
            declared = registry.get(pipeline)
        except UnknownPipeline:
            return settings.step_time_limit
        names = [s.name for s in declared.steps]
        if step not in names:
            return settings.step_time_limit
        # On the fast path one task runs this step and every step after it.
        running = names[names.index(step) :] if settings.fast_path else [step]
        return sum(_step_limit(settings, declared, name) for name in running)


class _Confirms:
    """RabbitMQ's publisher confirms on one channel, collected as they come.

    The broker numbers a confirm-mode channel's messages 1, 2, 3…; each number is noted with
    the job being sent when it was published (a job may publish more than its task message,
    e.g. a `task-sent` event), and a job is confirmed when all of its messages are acked.
    """

    def __init__(self) -> None:
        #: The job whose messages are being published now.
        self.sending = ""
        self.sent_by: dict[int, str] = {}
        self.acked: set[int] = set()
        self.nacked: set[int] = set()
        #: Every tag up to this one has an answer.
        self._floor = 0

    @classmethod
    def select(cls, channel: Any) -> _Confirms | None:
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
            confirms.sent_by[len(confirms.sent_by) + 1] = confirms.sending
            return publish(*args, **kwargs)

        channel.basic_publish = numbered
        return confirms

    def wait(self, conn: Any, *, timeout: float) -> None:
        """Read the broker's answers until every message published has one, or `timeout`
        seconds pass."""
        deadline = time.monotonic() + timeout
        while self._floor < len(self.sent_by):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=left)

    def unconfirmed(self) -> set[str]:
        """The jobs with a message the broker did not ack (nacked, or no answer yet)."""
        return {job for tag, job in self.sent_by.items() if tag not in self.acked}

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._answer(self.acked, tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._answer(self.nacked, tag, multiple)

    def _answer(self, into: set[int], tag: int, multiple: bool) -> None:
        # `multiple`: this tag and every earlier one not answered yet.
        first = self._floor + 1 if multiple else tag
        into.update(t for t in range(first, tag + 1) if not self._answered(t))
        while self._answered(self._floor + 1):
            self._floor += 1

    def _answered(self, tag: int) -> bool:
        return tag in self.acked or tag in self.nacked


def _step_limit(settings: Settings, pipeline: Pipeline[object], step: str) -> float:
    configured = settings.step_policies.get(f"{pipeline.name}.{step}")
    if configured is not None and configured.time_limit is not None:
        return configured.time_limit
    return pipeline.step(step).time_limit or settings.step_time_limit


def _bind(pipeline: Pipeline[object]) -> None:
    for step in pipeline.steps:
        name = task_name(pipeline.name, step.name)

        def run(task: Task[Any, Any], job_id: str, *, _step: str = step.name) -> str:
            dispatch = CeleryDispatch(task)
            try:
                outcome = run_step(runtime(), dispatch, pipeline, pipeline.step(_step), job_id)
            except DatabaseUnavailable as exc:
                # Acking now would drop the step; send it again and let the ledger sort it out.
                logger.warning("database unavailable: %s", exc.detail, extra={"action": "db_down"})
                dispatch.retry_later(_DATABASE_DOWN_DELAY)
            except SoftTimeLimitExceeded:
                # The limit struck while the attempt was being recorded, not while it acted:
                # send it again; its claim's lease tells the next delivery what to do.
                logger.warning("time limit hit while recording", extra={"action": "late_limit"})
                dispatch.retry_later(_LATE_LIMIT_DELAY)
            if outcome is Outcome.DEAD_LETTERED:
                # The dead letter is in Postgres already; rejecting also hands RabbitMQ the
                # message for its dead-letter queue (other brokers drop it).
                raise Reject(f"job {job_id} dead-lettered at {_step}", requeue=False)
            return str(outcome)

        # max_retries=None: the ledger counts attempts and decides when to stop, not Celery.
        app.task(
            name=name, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
        )(run)


registry.on_add(_bind)


@app.task(name=SWEEP_TASK, acks_late=False, ignore_result=True)
def sweep_task() -> dict[str, int]:
    """Beat's sweep: re-drive stalled jobs (see `jobs.sweeper`)."""
    report: SweepReport = sweep(runtime(), CeleryDispatch(), queued=lambda: queued_steps(app))
    return {
        "redriven": report.redriven,
        "skipped": report.skipped,
        "relayed": report.relayed,
        "backlog_wait": round(report.backlog_wait),
    }
