"""The Celery app: one task per pipeline step (`oncelery.<pipeline>.<step>`), each running
`jobs.runner.run_step`, and the sweep task beat runs; the per-process runtime, rebuilt after
every fork."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import (
    beat_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from kombu import Producer
from kombu.utils.uuid import uuid

from config import (
    MAIN_QUEUE,
    RETRY_QUEUE,
    SWEEP_TASK,
    Settings,
    celery_config,
    get_settings,
    prepare_broker,
)
from jobs.dispatch import READING_HEADER, message_reading, reading_header
from jobs.errors import UnknownPipeline
from jobs.pipelines import Pipeline, registry
from jobs.publishing import close_publishers, publisher_for
from jobs.queues import broker_watch, declare_dead_letter_queue, queued_steps
from jobs.redis_broker import LendRedisClient
from jobs.runner import Outcome, StepTimer, run_step, run_steps
from jobs.runtime import Runtime, load_pipelines, step_time_limit
from jobs.step_messages import Malformed, job_id_of, reject_malformed, task_name
from jobs.sweeper import SweepReport, sweep
from ledger import DatabaseUnavailable, Reading

logger = logging.getLogger(__name__)

#: Seconds before a step is tried again when the database could not be reached at all.
_DATABASE_DOWN_DELAY = 5.0
#: Seconds before a step whose time limit struck while it was being recorded is sent again.
_LATE_LIMIT_DELAY = 1.0
#: Seconds between a step's soft time limit (an exception it can handle) and the hard one.
_HARD_LIMIT_GRACE = 5


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
app.steps["consumer"].add(LendRedisClient)

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
    close_publishers()


@worker_ready.connect
def _declare_dead_letter_queue(**_: Any) -> None:
    # RabbitMQ drops a rejected message whose dead-letter exchange does not exist; the queue
    # is bounded, and one declared unbounded by an older version is replaced.
    if get_settings().broker_kind == "amqp":
        declare_dead_letter_queue(app)


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
        soft = math.ceil(self._time_limit(pipeline, step))
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
        return sum(step_time_limit(settings, declared, name) for name in running)


#: Each step task's pipeline and step name, by task name.
_STEPS: dict[str, tuple[Pipeline[object], str]] = {}


def is_repeat(delivery_info: Mapping[str, Any]) -> bool:
    """Whether a step's message may repeat an attempt: redelivered by the broker (its worker
    may have died on it), or sent again on the retry queue (a retry, a re-drive, a replay)."""
    return bool(delivery_info.get("redelivered")) or delivery_info.get("routing_key") == RETRY_QUEUE


def run_batch_of(
    task_name: str,
    job_ids: Sequence[str],
    timer: StepTimer,
    *,
    repeats: Sequence[bool],
    headers: Sequence[object],
) -> list[Outcome]:
    """Run a batch of one step task's messages (in a pool child, see `jobs.batching`);
    `headers`: each message's `READING_HEADER`, if any."""
    pipeline, name = _STEPS[task_name]
    step, rt = pipeline.step(name), runtime()
    readings = [
        message_reading(header, job_id, name)
        for job_id, header in zip(job_ids, headers, strict=True)
    ]
    return run_steps(
        rt,
        CeleryDispatch(),
        pipeline,
        step,
        job_ids,
        timer=timer,
        repeats=repeats,
        readings=readings,
    )


def _step_timer(settings: Settings) -> StepTimer | None:
    """What bounds each step of a task message in time. On the fast path one message runs
    several steps, and the task's limit is their sum: each step gets its own, from an alarm
    (a signal, so only where the task runs on the main thread, as in a prefork child). A
    message of the chained mode runs one step, which the task's limit bounds."""
    if not settings.fast_path or threading.current_thread() is not threading.main_thread():
        return None
    from jobs.batching import step_timer  # noqa: PLC0415 - jobs.batching imports this module

    return step_timer


def _bind(pipeline: Pipeline[object]) -> None:
    for step in pipeline.steps:
        name = task_name(pipeline.name, step.name)
        bound = name in _STEPS
        _STEPS[name] = (pipeline, step.name)
        if bound:
            # A pipeline declared again: its task runs the new declaration (it looks its step
            # up when it runs); Celery keeps the first callable registered under a name.
            continue
        # max_retries=None: the ledger counts attempts and decides when to stop, not Celery.
        # A prefork worker runs queued messages of the step in batches (`jobs.batching`).
        app.task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=None,
            Strategy="jobs.batching:strategy",
        )(_step_task(name))


def _step_task(name: str) -> Callable[..., str]:
    """The body of a step's task. It takes whatever the message brings and checks it itself:
    a message that cannot be a delivery is rejected once rather than failing in Celery's
    argument binding (and a keyword could not pick another step)."""

    def run(task: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
        pipeline, step = _STEPS[name]
        job_id = job_id_of(args, kwargs)
        if isinstance(job_id, Malformed):
            reject_malformed(runtime(), task.name, str(task.request.id), job_id)
            raise Reject(f"malformed step message: {job_id.detail}", requeue=False)
        dispatch = CeleryDispatch(task)
        repeat = is_repeat(task.request.delivery_info or {})
        # Celery keeps a message's own headers on its request.
        header = getattr(task.request, READING_HEADER, None)
        rt = runtime()
        try:
            outcome = run_step(
                rt,
                dispatch,
                pipeline,
                pipeline.step(step),
                job_id,
                repeat=repeat,
                reading=message_reading(header, job_id, step),
                timer=_step_timer(rt.settings),
            )
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
            raise Reject(f"job {job_id} dead-lettered at {step}", requeue=False)
        return str(outcome)

    return run


registry.on_add(_bind)


@app.task(name=SWEEP_TASK, acks_late=False, ignore_result=True)
def sweep_task() -> dict[str, int]:
    """One sweep, for whoever sends it (`celery call oncelery.sweep`); beat sweeps itself."""
    return _sweep_once()


@beat_init.connect
def _sweep_from_beat(**_: Any) -> None:
    # In beat's own process, on a thread of its own: no worker pool, busy with the messages a
    # sweep must re-drive, stands between the schedule and the sweep.
    threading.Thread(target=_sweep_forever, name="oncelery-sweeper", daemon=True).start()


def _sweep_forever() -> None:
    """Sweep every `ONCELERY_SWEEP_INTERVAL` seconds, for as long as beat runs (a sweep that
    fails is logged; the next one tries again)."""
    interval = get_settings().sweep_interval
    while True:
        began = time.monotonic()
        try:
            report = _sweep_once()
        except Exception:
            logger.exception("sweep failed", extra={"action": "sweep_failed"})
        else:
            if report["redriven"] or report["relayed"]:
                logger.info("swept: %s", report, extra={"action": "swept"})
        time.sleep(max(0.0, interval - (time.monotonic() - began)))


def _sweep_once() -> dict[str, int]:
    """Re-drive what the sweeper finds (see `jobs.sweeper`); what it did."""
    report: SweepReport = sweep(
        runtime(), CeleryDispatch(), queued=lambda: queued_steps(app), watch=broker_watch(app)
    )
    return {
        "redriven": report.redriven,
        "abandoned": report.abandoned,
        "lost": report.lost,
        "skipped": report.skipped,
        "relayed": report.relayed,
        "backlog_wait": round(report.backlog_wait),
    }
