"""A call of a decorated task run through the engine's step protocol (`jobs.engine.run`):
its job created (or found) with the message that re-sends it, its key claimed, its body run,
its result recorded — and what the run's outcome means to the Celery task."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn
from uuid import UUID

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from config import get_settings
from jobs import retry
from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.errors import CallDeadLettered, NotInCall
from jobs.pipelines import StepContext
from jobs.tasks.calls import STEP, Call, CallSpec, TaskPipeline, task_pipeline
from jobs.tasks.messages import decorated_followers, hands_on, request_message
from ledger import (
    ACTIVE_JOB_STATES,
    JSON,
    DatabaseUnavailable,
    DeadLetterState,
    DeadLetterStore,
    Job,
    JobState,
)

logger = logging.getLogger(__name__)

# A soft time limit ends an attempt like a timeout: retried by the policy. So does a body's
# own `self.retry()` (left from before the decorator): its message and the policy's both come
# back, and the ledger absorbs the second.
retry.treat_as_transient(SoftTimeLimitExceeded)
retry.treat_as_transient(Retry)

#: Seconds before a call is tried again when the database could not be reached at all.
DATABASE_DOWN_DELAY: Final = 5.0
#: Seconds before a call whose time limit struck while it was being recorded is sent again.
LATE_LIMIT_DELAY: Final = 1.0

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_pipelines: dict[str, TaskPipeline] = {}


def _after_fork_in_child() -> None:
    # A fork while another thread (the calls' sweeper) held the lock would leave the child's
    # copy locked for ever; the child builds its own runtime anyway.
    global _runtime_lock  # noqa: PLW0603
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def runtime() -> Runtime:
    """This process's runtime (the ledger on `DATABASE_URL`), built on first use and again
    after a fork: a prefork child never shares its parent's connections."""
    global _runtime  # noqa: PLW0603 - one runtime per process, by design
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime.from_settings(get_settings())
        return _runtime


def close_runtime() -> None:
    """Close this process's runtime (a worker child shutting down; a test done with its
    database); the next call builds a new one."""
    global _runtime  # noqa: PLW0603
    with _runtime_lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.close()
        _runtime = None


@dataclass
class _Body:
    """The body of the call running in this context, and what it returned."""

    run: Callable[[], Any]
    result: JSON = None
    ran: bool = False


_body: ContextVar[_Body | None] = ContextVar("oncelery_call_body", default=None)
_key: ContextVar[str | None] = ContextVar("oncelery_call_key", default=None)


def idempotency_key() -> str:
    """The key the running call claimed: pass it to the provider (`Idempotency-Key`).

    Raises:
        NotInCall: outside the body of a task decorated with `exactly_once`.
    """
    key = _key.get()
    if key is None:
        raise NotInCall()
    return key


def _act(ctx: StepContext[object]) -> JSON:
    """The step of a decorated task's pipeline: the body of the call running here."""
    body = _body.get()
    if body is None:  # pragma: no cover - only `run_call` runs these pipelines
        raise NotInCall()
    token = _key.set(ctx.key)
    try:
        result = body.run()
    finally:
        _key.reset(token)
    body.result, body.ran = result, True
    return body.result


def pipeline_for(task: str, spec: CallSpec) -> TaskPipeline:
    """The pipeline of decorated task `task`, built once per process."""
    found = _pipelines.get(task)
    if found is None:
        found = _pipelines[task] = task_pipeline(
            task, _act, delivery=spec.delivery, retry=spec.retry, effect=spec.effect
        )
    return found


@dataclass
class CallDispatch:
    """How a run of a call hands it back to the broker: Celery's own retry of the task (same
    task id, same canvas), whatever the task's `max_retries` — the ledger counts attempts."""

    task: Task[Any, Any]
    sent: list[float] = field(default_factory=list)

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        """Publish the call again (a call's pipeline has one step: nothing follows it)."""
        del pipeline, step, job_id, resend
        again = self.task.signature_from_request()
        if countdown is None:
            again.apply_async()
        else:
            again.apply_async(countdown=countdown)

    def retry_later(self, delay: float) -> NoReturn:
        """End this attempt; the task's message comes back after `delay` seconds."""
        self.sent.append(delay)
        raise self.task.retry(countdown=delay, max_retries=sys.maxsize)


def run_call(task: Task[Any, Any], spec: CallSpec, call: Call, body: Callable[[], Any]) -> JSON:
    """Run one call: its recorded result, from this run or an earlier one.

    Raises:
        CallDeadLettered: the call is dead-lettered; a person decides.
        celery.exceptions.Retry: the call comes back later (its key is busy elsewhere, or
            the attempt failed and the policy retries it).
        celery.exceptions.Ignore: another run took the key over; this one must not go on.
    """
    rt = runtime()
    dispatch = CallDispatch(task)
    try:
        return _run_call(rt, task, spec, call, body, dispatch)
    except DatabaseUnavailable as exc:
        logger.warning("database unavailable: %s", exc.detail, extra={"action": "db_down"})
        dispatch.retry_later(DATABASE_DOWN_DELAY)
    except SoftTimeLimitExceeded:
        logger.warning("time limit hit while recording", extra={"action": "late_limit"})
        dispatch.retry_later(LATE_LIMIT_DELAY)


def _run_call(
    rt: Runtime,
    task: Task[Any, Any],
    spec: CallSpec,
    call: Call,
    body: Callable[[], Any],
    dispatch: CallDispatch,
) -> JSON:
    pipeline = pipeline_for(task.name, spec)
    message = request_message(task)
    new_job = call.new_job(message, parent=task.request.parent_id, hands_on=hands_on(message))
    [(job_id, created)] = rt.store.create_jobs([new_job], dispatched=True)
    if not created:
        job = rt.store.get_job(job_id)
        if job.state is not JobState.PENDING and job.state is not JobState.RUNNING:
            # A repeat of a finished call: its answer, without a claim.
            if job.state is JobState.SUCCEEDED and _followed(rt, task, message):
                logger.info(
                    "repeat of a call its canvas went on from: not handed on again",
                    extra={"action": "duplicate", "job_id": str(job_id), "key": call.key},
                )
                raise Ignore()
            return _ended(rt, call, job)
    holder = _Body(body)
    token = _body.set(holder)
    try:
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        outcome = run_step(
            rt, dispatch, pipeline, pipeline.step(STEP), str(job_id), repeat=redelivered
        )
    finally:
        _body.reset(token)
    if outcome is Outcome.SUCCEEDED and holder.ran:
        result: JSON = json.loads(json.dumps(holder.result))
        return result
    if outcome is Outcome.FENCED:
        # Its lease was taken over while it acted: the other run records and goes on.
        raise Ignore()
    if outcome is Outcome.RETRYING:
        # Its retry waits as a timer (set with the failure's record): this message is done
        # with, and the calls' sweeper re-sends the kept one when the timer fires.
        raise Retry("the call's retry waits for its timer")
    job = rt.store.get_job(job_id)
    if outcome is Outcome.INACTIVE and job.state in ACTIVE_JOB_STATES:
        # A copy of it (a redelivery) while its retry timer is pending: absorbed, not run.
        raise Retry("the call's retry waits for its timer")
    return _ended(rt, call, job)


def _followed(rt: Runtime, task: Task[Any, Any], message: dict[str, JSON]) -> bool:
    """Whether every call this call hands on to is kept already, naming it as its parent: a
    repeat of it must then not hand on again (Celery would publish them a second time). A
    call handing on to something else too (a plain task, a chord) is handed on again, as
    before: a hand-on cut short by a crash must be finished, and a plain task's publish
    leaves nothing to count."""
    expected = decorated_followers(message)
    if not expected or not isinstance(task.request.id, str):
        return False
    return rt.store.count_children(task.request.id) >= expected


def _ended(rt: Runtime, call: Call, job: Job) -> JSON:
    """The answer of a call whose job ended: its recorded result, or why there is none.

    Raises:
        celery.exceptions.Ignore: the call was cancelled (revoked): it must not act, and
            its canvas does not go on.
    """
    if job.state is JobState.CANCELLED:
        logger.info(
            "repeat of a cancelled call: not run",
            extra={"action": "cancelled", "job_id": str(job.id), "step": STEP, "key": call.key},
        )
        raise Ignore()
    if job.state is JobState.SUCCEEDED:
        logger.info(
            "repeat of a recorded call: its result, not run again",
            extra={"action": "duplicate", "job_id": str(job.id), "step": STEP, "key": call.key},
        )
        return job.results.get(STEP)
    raise _dead_lettered(rt, call, job.id, job.state)


def _dead_lettered(rt: Runtime, call: Call, job_id: UUID, state: JobState) -> CallDeadLettered:
    letters = DeadLetterStore(engine=rt.engine).list(state=None, job_id=job_id)
    if not letters:
        return CallDeadLettered(call.task, call.key, str(job_id), str(state), "see its history")
    letter = letters[-1]
    open_or = "" if letter.state is DeadLetterState.OPEN else f" ({letter.state})"
    return CallDeadLettered(
        call.task, call.key, str(job_id), f"{letter.reason}{open_or}", letter.message
    )
