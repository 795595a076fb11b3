"""Each step's task: which pipeline step a task name runs, and how one message, or a batch of
them, runs it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from config import RETRY_QUEUE
from jobs.engine.dispatch import READING_HEADER, message_reading
from jobs.engine.items import run_items
from jobs.engine.run import Outcome, StepTimer, run_step, run_steps
from jobs.engine.step_messages import Malformed, items_of, job_id_of, reject_malformed
from jobs.maps import MapStep
from jobs.pipelines import Pipeline
from jobs.worker.app import runtime
from jobs.worker.publishing import CeleryDispatch
from jobs.worker.time_limits import step_timer, step_timer_for
from ledger import DatabaseUnavailable

logger = logging.getLogger(__name__)

#: Seconds before a step is tried again when the database could not be reached at all.
_DATABASE_DOWN_DELAY = 5.0
#: Seconds before a step whose time limit struck while it was being recorded is sent again.
_LATE_LIMIT_DELAY = 1.0

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
    """Run a batch of one step task's messages (in a pool child, see `jobs.worker.batching`);
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


def run_items_message(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[str]:
    """Run one message of a map step's items (`[job_id, [item_id, …]]`); each item is
    claimed, acted on, recorded, retried or dead-lettered on its own, so the message is
    acknowledged whatever became of each (a crash before that redelivers it: the ledger
    absorbs what was done)."""
    pipeline, step = _STEPS[task.name]
    found = items_of(args, kwargs)
    if isinstance(found, Malformed):
        reject_malformed(runtime(), task.name, str(task.request.id), found)
        raise Reject(f"malformed item message: {found.detail}", requeue=False)
    job_id, item_ids = found
    map_step = pipeline.step(step)
    assert isinstance(map_step, MapStep)
    dispatch = CeleryDispatch(task)
    rt = runtime()
    # In a prefork child each item gets its own time limit from an alarm; the message's
    # limit bounds them all.
    timer = step_timer if threading.current_thread() is threading.main_thread() else None
    repeat = is_repeat(task.request.delivery_info or {})
    try:
        outcomes = run_items(
            rt, dispatch, pipeline, map_step, job_id, item_ids, timer=timer, repeat=repeat
        )
    except DatabaseUnavailable as exc:
        logger.warning("database unavailable: %s", exc.detail, extra={"action": "db_down"})
        dispatch.retry_later(_DATABASE_DOWN_DELAY)
    except SoftTimeLimitExceeded:
        logger.warning("time limit hit while recording", extra={"action": "late_limit"})
        dispatch.retry_later(_LATE_LIMIT_DELAY)
    return [str(outcome) for outcome in outcomes]


def declare(pipeline: Pipeline[object], name: str, step: str) -> bool:
    """Make task `name` run `step` of `pipeline`; whether the task name was declared before
    (a pipeline declared again: its task runs the new declaration, looked up when it runs)."""
    known = name in _STEPS
    _STEPS[name] = (pipeline, step)
    return known


def run_message(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Run one message of a step's task. It takes whatever the message brings and checks it
    itself: a message that cannot be run is rejected once rather than failing in
    Celery's argument binding (and a keyword could not pick another step)."""
    pipeline, step = _STEPS[task.name]
    job_id = job_id_of(args, kwargs)
    if isinstance(job_id, Malformed):
        reject_malformed(runtime(), task.name, str(task.request.id), job_id)
        raise Reject(f"malformed step message: {job_id.detail}", requeue=False)
    dispatch = CeleryDispatch(task)
    repeat = is_repeat(task.request.delivery_info or {})
    # Celery keeps a message's own headers on its request.
    header = getattr(task.request, READING_HEADER, None)
    rt, declared = runtime(), pipeline.step(step)
    try:
        outcome = run_step(
            rt,
            dispatch,
            pipeline,
            declared,
            job_id,
            repeat=repeat,
            reading=message_reading(header, job_id, step),
            timer=step_timer_for(rt.settings, declared),
        )
    except DatabaseUnavailable as exc:
        # Acking now would drop the step; send it again and let the ledger sort it out.
        logger.warning("database unavailable: %s", exc.detail, extra={"action": "db_down"})
        dispatch.retry_later(_DATABASE_DOWN_DELAY)
    except SoftTimeLimitExceeded:
        # The limit struck while the attempt was being recorded, not while it acted:
        # send it again; its claim's lease tells the next run what to do.
        logger.warning("time limit hit while recording", extra={"action": "late_limit"})
        dispatch.retry_later(_LATE_LIMIT_DELAY)
    if outcome is Outcome.DEAD_LETTERED:
        # The dead letter is in Postgres already; rejecting also hands RabbitMQ the
        # message for its dead-letter queue (other brokers drop it).
        raise Reject(f"job {job_id} dead-lettered at {step}", requeue=False)
    return str(outcome)
