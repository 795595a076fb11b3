"""A call Celery's hard time limit killed is dead-lettered, `time_limit`: Celery failed it
(`TimeLimitExceeded`: its errbacks ran, its message was acknowledged), so the calls' sweeper
must not send it again to succeed behind its canvas's back. `dlq replay` sends it again."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure

from jobs.pipelines import Delivery
from jobs.tasks.calls import SPEC_ATTRIBUTE, STEP, Call, CallSpec
from jobs.tasks.publishing import is_bound
from jobs.tasks.running import runtime
from ledger import JSON, DeadLetterReason, Job, JobState, StepState

logger = logging.getLogger(__name__)


def dead_letter_timed_out(
    task: Task[Any, Any],
    spec: CallSpec,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    limit: object,
) -> Job | None:
    """Dead-letter the unfinished call a killed message of `task` carried, if it is the call's
    kept message (a copy sent under another task id is another canvas's: the call is left to
    the copy it was kept from); its key, if the killed run held it, becomes `failed`, or
    `unknown` for an at-most-once call (it may have acted). The job after, or None when no
    job of this call was kept under `task_id` (its run was killed before keeping it: nothing
    sends it again)."""
    positional = (task, *args) if is_bound(task) else tuple(args)
    call = Call.bind(task.name, spec, positional, kwargs, bound=is_bound(task))
    rt = runtime()
    job_id = rt.store.job_id_of(call.pipeline, call.event_id)
    if job_id is None:
        return None
    job = rt.store.get_job(job_id)
    if job.context.get("task_id") != task_id:
        return None
    if job.state not in (JobState.PENDING, JobState.RUNNING):
        return job
    message = (
        f"Celery's hard time limit ({limit} s) killed the call and reported it failed (its "
        f"errbacks ran); not re-sent: replay it to run it again"
    )
    at_most_once = spec.delivery is Delivery.AT_MOST_ONCE
    error: JSON = {"type": "TimeLimitExceeded", "message": message}
    rt.ledger.dead_letter(
        job.id,
        STEP,
        error,
        reason=DeadLetterReason.TIME_LIMIT,
        key=call.key,
        started_as=StepState.UNKNOWN if at_most_once else StepState.FAILED,
    )
    logger.error(
        "call dead-lettered: %s",
        message,
        extra={"action": "time_limit", "job_id": str(job.id), "key": call.key},
    )
    return rt.store.get_job(job.id)


# Celery sends `task_failure` with `TimeLimitExceeded` from the worker's main process (the
# pool's child is gone): `Request.on_timeout`, and `Request.on_failure` for the same kill.
@task_failure.connect
def _on_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    spec = getattr(getattr(sender, "run", None), SPEC_ATTRIBUTE, None)
    if not isinstance(exception, TimeLimitExceeded) or task_id is None:
        return
    if not isinstance(sender, Task) or not isinstance(spec, CallSpec):
        return
    limit = exception.args[0] if exception.args else "?"
    try:
        dead_letter_timed_out(sender, spec, task_id, args or (), kwargs or {}, limit)
    except Exception as exc:  # noqa: BLE001 - the call is then re-sent, as before
        logger.warning(
            "call past its time limit not dead-lettered: %s",
            exc,
            extra={"action": "time_limit_failed", "task_id": task_id},
        )
