"""A revoked call (`AsyncResult.revoke()`, `app.control.revoke`) is cancelled: its job ends
`cancelled`, so the sweeper never sends it again and a repeat of it does not act. Celery's
`task_revoked` cancels it where a worker drops its message; the sweeper checks the worker's
revocations before each re-send too (a cancel the database missed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from celery import Task
from celery.signals import task_revoked
from celery.worker import state as worker_state

from jobs.tasks.calls import SPEC_ATTRIBUTE, Call, CallSpec
from jobs.tasks.messages import as_json
from jobs.tasks.publishing import is_bound
from jobs.tasks.running import runtime
from ledger import JSON, Job, JobState, JobStore

logger = logging.getLogger(__name__)

#: Who cancelled a revoked call, for its history.
REVOKED_BY = "celery:revoke"


def is_revoked(task_id: object) -> bool:
    """Whether this worker was told to revoke Celery task `task_id` (its revocations are
    held in its main process, where the calls' sweeper runs)."""
    return isinstance(task_id, str) and task_id in worker_state.revoked


def cancel_call(store: JobStore, job_id: UUID, task_id: str) -> Job:
    """Cancel the job of a revoked call (a job already ended stays as it was)."""
    job = store.cancel(job_id, by=REVOKED_BY, reason=f"task {task_id} revoked")
    logger.warning(
        "revoked call cancelled",
        extra={"action": "revoked", "job_id": str(job_id), "task_id": task_id},
    )
    return job


def cancel_revoked(
    task: Task[Any, Any],
    spec: CallSpec,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> Job | None:
    """Cancel the call a revoked message of `task` carries, if it is the call's kept message
    (the same call sent again under another task id is a duplicate: revoking that copy
    leaves the call alone); the job as it stands after, or None when it is not this call's.

    A worker may drop the message before its sender kept the call (it keeps it after the
    publish): the call's job is then made here, cancelled, and the sender's keep finds it.
    """
    positional = (task, *args) if is_bound(task) else tuple(args)
    call = Call.bind(task.name, spec, positional, kwargs, bound=is_bound(task))
    store = runtime().store
    message: dict[str, JSON] = {
        "task": task.name,
        "args": as_json(list(args)),
        "kwargs": as_json(dict(kwargs)),
        "options": {"task_id": task_id},
    }
    [(job_id, _)] = store.create_jobs([call.new_job(message)], dispatched=True)
    job = store.get_job(job_id)
    if job.context.get("task_id") != task_id:
        return None
    if job.state not in (JobState.PENDING, JobState.RUNNING):
        return job
    return cancel_call(store, job.id, task_id)


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    spec = getattr(getattr(sender, "run", None), SPEC_ATTRIBUTE, None)
    if not isinstance(sender, Task) or not isinstance(spec, CallSpec) or request is None:
        return
    if expired:
        # Past its `expires` before it started: never kept. A started call's kept message
        # drops its expiry (`messages.request_message`): the sweeper finishes it.
        return
    try:
        cancel_revoked(sender, spec, str(request.id), request.args or (), request.kwargs or {})
    except Exception as exc:  # noqa: BLE001 - the sweeper checks revocations before sending
        logger.warning(
            "revoked call not cancelled: %s",
            exc,
            extra={"action": "revoke_failed", "task_id": getattr(request, "id", None)},
        )
