"""A message of a wait step, which no worker runs: a stale copy (an outbox resending the step
its job was at when it published, by then a wait) is absorbed, and a job moved to a wait with
no timer (a person's `dlq resolve` of the step before, a replay of the wait's dead letter)
gets its wait armed now — never dead-lettered for the message."""

from __future__ import annotations

import logging
from uuid import UUID

from jobs.engine.dispatch import Dispatch
from jobs.engine.run_state import Outcome
from jobs.engine.runtime import Runtime
from jobs.engine.timers import wait_or_error
from jobs.pipelines import Pipeline
from jobs.waits import Wait
from ledger import DeadLetterReason, JobNotFound, JobState

logger = logging.getLogger(__name__)


def arm_from_message(
    rt: Runtime, dispatch: Dispatch, pipeline: Pipeline[object], wait: Wait[object], job_id: str
) -> Outcome:
    """Absorb or arm a message of `wait` for a job; a kept signal that ends the wait at once
    hands the job on (`dispatch.send` of the step after it)."""
    log = {"job_id": job_id, "step": wait.name}
    try:
        job = rt.store.get_job(UUID(job_id))
    except JobNotFound:
        return Outcome.INACTIVE
    after = pipeline.next_step(wait.name)
    then = after.name if after is not None else None
    found = wait_or_error(wait, job.context, job.results, then)
    if isinstance(found, dict):
        if job.current_step != wait.name or job.state is not JobState.RUNNING:
            return Outcome.INACTIVE
        reason = DeadLetterReason.PERMANENT
        rt.ledger.dead_letter(job.id, wait.name, found, reason=reason)
        return Outcome.DEAD_LETTERED
    due, signal = found
    armed = rt.ledger.arm_wait(job.id, wait.name, due, signal)
    if armed is False:
        logger.info("a stale message of a wait step absorbed", extra={"action": "absorbed", **log})
        return Outcome.INACTIVE
    if armed is True:
        logger.info("the wait is armed", extra={"action": "wait_armed", **log})
        return Outcome.DUPLICATE
    if armed is JobState.RUNNING and then is not None:
        try:
            dispatch.send(pipeline.name, then, job_id)
        except Exception as exc:  # noqa: BLE001 - the signal's row is its outbox: resent
            logger.warning("step after a kept signal not sent: %s", exc, extra=log)
        else:
            rt.signals.mark_sent([job.id], wait.name)
    return Outcome.SUCCEEDED
