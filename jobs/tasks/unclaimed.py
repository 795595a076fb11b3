"""Calls no worker claims: one re-sent `ONCELERY_CALL_MAX_RESENDS` times (its app's workers
have its task, but none that consumes its queue; or a changed key template makes its run
another call), or one of a task the app does not have whose message goes to the app's
queues (renamed, removed). Each is dead-lettered, `never_claimed`, saying why."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final
from uuid import UUID

from celery import Celery

from jobs.engine.runtime import Runtime
from jobs.tasks.calls import PIPELINE_PREFIX, STEP
from ledger import JSON, DeadLetterReason

logger = logging.getLogger(__name__)

#: Stray calls dead-lettered per sweep.
_BATCH: Final = 200


def consumed_queues(app: Celery) -> list[str]:
    """The queues the app's workers consume (its default queue unless told otherwise)."""
    return list(app.amqp.queues.consume_from or [app.conf.task_default_queue])


def dead_letter_unclaimed(
    rt: Runtime, app: Celery, job_id: UUID, context: Mapping[str, JSON]
) -> None:
    """Dead-letter a call of one of the app's tasks, re-sent `call_max_resends` times and
    never claimed: a person finds why (`dlq list`), fixes it and replays it."""
    queue = queue_of(context.get("message")) or app.conf.task_default_queue
    _dead_letter(
        rt,
        job_id,
        context,
        f"re-sent {rt.settings.call_max_resends} times and never claimed: no worker consuming "
        f"queue {queue!r} runs task {context.get('task')!r} decorated with exactly_once (not "
        f"registered there, or not decorated), or its key template changed so that its run "
        f"is another call; fix that, then replay this dead letter",
    )


def dead_letter_strays(
    rt: Runtime, app: Celery, pipelines: Sequence[str], *, older_than: float
) -> list[str]:
    """Dead-letter the calls of tasks `app` does not have (its decorated tasks' `pipelines`
    aside) whose message goes to a queue its workers consume, unclaimed and untouched for
    `older_than` seconds: its workers drop such a message as unregistered, and no sweeper
    re-sends it (another app's would have touched it, another app's worker claimed it);
    the job ids."""
    queues = consumed_queues(app)
    strays = rt.store.unclaimed_calls(
        prefix=PIPELINE_PREFIX, excluded=pipelines, queues=queues, older_than=older_than,
        limit=_BATCH,
    )  # fmt: skip
    for job in strays:
        queue = queue_of(job.context.get("message"))
        _dead_letter(
            rt,
            job.id,
            job.context,
            f"never claimed: task {job.context.get('task')!r} is not a task of app "
            f"{app.main!r} (or not decorated with exactly_once there), whose workers consume "
            f"queue {queue!r} where its message goes: renamed or removed? Register it, then "
            f"replay this dead letter (if a worker ran it undecorated, its effect may be real: "
            f"check first)",
        )
    return [str(job.id) for job in strays]


def _dead_letter(rt: Runtime, job_id: UUID, context: Mapping[str, JSON], message: str) -> None:
    key = context.get("key")
    logger.error(
        "call dead-lettered: %s",
        message,
        extra={"action": "never_claimed", "job_id": str(job_id), "key": key},
    )
    error: JSON = {"type": "NeverClaimed", "message": message}
    rt.ledger.dead_letter(
        job_id,
        STEP,
        error,
        reason=DeadLetterReason.NEVER_CLAIMED,
        key=key if isinstance(key, str) else None,
    )


def queue_of(message: JSON) -> str | None:
    """The queue a kept message goes to (its routing key, sent through an exchange)."""
    options = message.get("options") if isinstance(message, dict) else None
    if not isinstance(options, dict):
        return None
    queue = options.get("queue") or options.get("routing_key")
    return queue if isinstance(queue, str) and queue else None
