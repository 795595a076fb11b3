"""Running one step of one job: claim → act → record, then hand the job on.

Celery-free on purpose: `jobs/app.py` binds it to tasks through a `Dispatch`, and tests can
drive it with their own.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import random
import time
import traceback
from collections.abc import Callable
from typing import NoReturn, Protocol
from uuid import UUID

from config.settings import CrashPoint
from jobs import retry
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.runtime import Runtime
from ledger import (
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    Failure,
    FingerprintMismatch,
    InFlight,
    JobInactive,
    JobState,
    LeaseLost,
    OutcomeUnknown,
    StatementRejected,
    StepNotInJob,
)

logger = logging.getLogger(__name__)

#: Seconds between looks at a key another owner holds (at most the rest of its lease).
_IN_FLIGHT_POLL = 1.0


class Dispatch(Protocol):
    """How the runner hands a job on."""

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        """Publish a step of a job (`resend`: it was sent before, e.g. a replay or a re-drive,
        so it travels on the retry queue; `countdown`: not before that many seconds)."""

    def retry_later(self, delay: float) -> NoReturn:
        """Publish the current step again after `delay` seconds, and end this attempt."""


class Outcome(enum.StrEnum):
    """How one delivery of a step ended."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    #: The key was already recorded: a duplicate delivery, absorbed by the ledger.
    DUPLICATE = "duplicate"
    #: The job may not run (finished, cancelled, dead-lettered, missing).
    INACTIVE = "inactive"
    #: The lease was taken over while acting: this owner neither records nor continues.
    FENCED = "fenced"


class HandedBack(Exception):
    """A step reached by the fast path went back to the broker (a retry, or its key was busy):
    the task that carried the job this far is done."""


class _Continuation:
    """The dispatch for steps the fast path runs inline: their "retry later" publishes them
    as tasks of their own, since the running task is another step's."""

    def __init__(self, dispatch: Dispatch, pipeline: str, step: str, job_id: str) -> None:
        self.dispatch, self.pipeline, self.step, self.job_id = dispatch, pipeline, step, job_id

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        self.dispatch.send(pipeline, step, job_id, resend=resend, countdown=countdown)

    def retry_later(self, delay: float) -> NoReturn:
        self.dispatch.send(self.pipeline, self.step, self.job_id, resend=True, countdown=delay)
        raise HandedBack(self.step)


def run_step(
    rt: Runtime, dispatch: Dispatch, pipeline: Pipeline[object], step: Step[object], job_id: str
) -> Outcome:
    """Run one delivery of a step (and, on the fast path, the steps after it); see DESIGN.md,
    "The step protocol"."""
    rt.crash(CrashPoint.BEFORE_CLAIM, step.name, job_id)
    takeover = step.delivery is Delivery.EXACTLY_ONCE
    claim = functools.partial(
        rt.ledger.claim_step, UUID(job_id), step.name, takeover_expired=takeover
    )
    try:
        return _run_claimed(rt, dispatch, pipeline, step, job_id, claim)
    except HandedBack:
        return Outcome.RETRYING


def _run_claimed(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: Step[object],
    job_id: str,
    claim: Callable[[], ClaimOutcome],
) -> Outcome:
    """Claim (via `claim`), then act on what the claim found."""
    job = UUID(job_id)
    log = {"job_id": job_id, "step": step.name}
    try:
        outcome = claim()
    except FingerprintMismatch as exc:
        logger.error("%s", exc, extra={"action": "dead_letter", **log, "key": exc.key})
        rt.ledger.dead_letter(
            job,
            step.name,
            _error_json(exc, retryable=False),
            reason=DeadLetterReason.FINGERPRINT_MISMATCH,
            key=exc.key,
        )
        return Outcome.DEAD_LETTERED
    except (StepNotInJob, StatementRejected) as exc:
        # The job cannot run this step as it stands (a plan without the step, a value the
        # database refuses): no retry can fix that, a person must look.
        logger.error("%s", exc, extra={"action": "dead_letter", **log})
        rejected = _error_json(exc, retryable=False)
        rt.ledger.dead_letter(job, step.name, rejected, reason=DeadLetterReason.PERMANENT)
        return Outcome.DEAD_LETTERED
    if isinstance(outcome, JobInactive):
        logger.info("job is %s; step not run", outcome.state, extra={"action": "skip", **log})
        return Outcome.INACTIVE
    if isinstance(outcome, InFlight):
        logger.info(
            "key in flight elsewhere", extra={"action": "in_flight", **log, "key": outcome.key}
        )
        # Poll rather than wait out the whole lease: the other owner usually finishes soon.
        dispatch.retry_later(min(outcome.retry_in, _IN_FLIGHT_POLL + random.random() / 2))
    if isinstance(outcome, OutcomeUnknown):
        error: JSON = {
            "type": "OutcomeUnknown",
            "message": "owner vanished between acting and recording",
            "retryable": False,
        }
        if not rt.ledger.declare_unknown(outcome, error):
            # Its owner recorded late, or another took the key over: look again.
            dispatch.retry_later(_IN_FLIGHT_POLL)
        logger.error("outcome unknown", extra={"action": "dead_letter", **log, "key": outcome.key})
        return Outcome.DEAD_LETTERED
    if isinstance(outcome, AlreadySucceeded):
        return _absorb_duplicate(rt, dispatch, pipeline, step, outcome)
    return _act(rt, dispatch, pipeline, step, outcome)


def _absorb_duplicate(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: Step[object],
    outcome: AlreadySucceeded,
) -> Outcome:
    following = pipeline.next_step(step.name)
    next_name = following.name if following else None
    if outcome.recorded_for_this_job and outcome.current_step != step.name:
        rt.ledger.note_duplicate(outcome)
        # A redelivery after the record: the next step's publish may have been lost with
        # the worker, so publish it again; a second copy is absorbed the same way.
        if following is not None and outcome.current_step == next_name:
            dispatch.send(pipeline.name, following.name, str(outcome.job_id))
    # Another job's result (the same request sent twice), or this job's own result for a
    # step it never moved past (a replay of a step that had in fact succeeded): adopt it.
    elif rt.ledger.adopt_result(outcome, next_step=next_name) is JobState.RUNNING and following:
        dispatch.send(pipeline.name, following.name, str(outcome.job_id))
    logger.info(
        "duplicate absorbed",
        extra={
            "action": "duplicate",
            "job_id": str(outcome.job_id),
            "step": step.name,
            "key": outcome.key,
        },
    )
    return Outcome.DUPLICATE


def _act(
    rt: Runtime, dispatch: Dispatch, pipeline: Pipeline[object], step: Step[object], claim: Claim
) -> Outcome:
    policy = rt.retry_policy_for(pipeline.name, step)
    if claim.attempt > policy.max_attempts:
        # Only crashed attempts get here: a message that kills its worker every time.
        error: JSON = {
            "type": "worker_lost",
            "retryable": False,
            "message": f"{claim.attempt - 1} attempts ended without a record",
        }
        # The crashed attempts may have acted before dying.
        failure = Failure(
            error=error,
            retry_in=None,
            outcome_unknown=step.effect is not None,
            reason=DeadLetterReason.WORKER_LOST,
        )
        return _record_failure(rt, dispatch, claim, failure)
    ctx = StepContext(
        job_id=str(claim.job_id),
        pipeline=pipeline.name,
        step=step.name,
        key=claim.key,
        attempt=claim.attempt,
        context=claim.context,
        results=claim.results,
        resources=rt.resources_for(pipeline),
    )
    rt.crash(CrashPoint.AFTER_CLAIM, step.name, ctx.job_id)
    started = time.monotonic()
    try:
        result = step.run(ctx)
        json.dumps(result)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
        duration_ms = (time.monotonic() - started) * 1000
        return _handle_failure(
            rt, dispatch, step, claim, exc, duration_ms=duration_ms, policy=policy
        )
    duration_ms = (time.monotonic() - started) * 1000
    rt.crash(CrashPoint.AFTER_ACT, step.name, ctx.job_id)
    following = pipeline.next_step(step.name)
    if following is not None and rt.settings.fast_path:
        return _go_on(rt, dispatch, pipeline, claim, (result, duration_ms), following)
    try:
        recorded = rt.ledger.record_success(
            claim, result, next_step=following.name if following else None, duration_ms=duration_ms
        )
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **_log(claim)})
        return Outcome.FENCED
    logger.info("step succeeded", extra={"action": "succeeded", **_log(claim)})
    rt.crash(CrashPoint.AFTER_RECORD, step.name, ctx.job_id)
    if following is not None and recorded.job_state is JobState.RUNNING:
        dispatch.send(pipeline.name, following.name, str(claim.job_id))
    rt.crash(CrashPoint.AFTER_PUBLISH, step.name, ctx.job_id)
    return Outcome.SUCCEEDED


def _go_on(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    claim: Claim,
    done: tuple[JSON, float],
    following: Step[object],
) -> Outcome:
    """The fast path: record this step and claim the next in one statement, then run the next
    step here instead of publishing it — one broker message per order instead of one per
    step. Every step is still claimed and recorded, so a crash resumes from the ledger."""
    result, duration_ms = done
    takeover = following.delivery is Delivery.EXACTLY_ONCE

    def record_and_claim() -> ClaimOutcome:
        # The next step's claim rides on this step's record, so "before its claim" is here.
        rt.crash(CrashPoint.BEFORE_CLAIM, following.name, str(claim.job_id))
        try:
            recorded, outcome = rt.ledger.record_and_claim_next(
                claim,
                result,
                next_step=following.name,
                duration_ms=duration_ms,
                takeover_expired=takeover,
            )
        except LeaseLost as exc:
            logger.warning("%s", exc, extra={"action": "fenced", **_log(claim)})
            raise _Fenced from exc
        rt.crash(CrashPoint.AFTER_RECORD, claim.step, str(claim.job_id))
        rt.crash(CrashPoint.AFTER_PUBLISH, claim.step, str(claim.job_id))
        if outcome is None:
            # Nothing was claimed (an ambiguous earlier commit, or the job stopped): hand the
            # next step to the broker if the job still runs; its claim will sort it out.
            if recorded.job_state is JobState.RUNNING:
                dispatch.send(pipeline.name, following.name, str(claim.job_id))
            raise _Stopped
        return outcome

    continuation = _Continuation(dispatch, pipeline.name, following.name, str(claim.job_id))
    try:
        return _run_claimed(
            rt, continuation, pipeline, following, str(claim.job_id), record_and_claim
        )
    except _Fenced:
        return Outcome.FENCED
    except _Stopped:
        return Outcome.SUCCEEDED


class _Fenced(Exception):
    """The fast path's record was refused: the chain stops here."""


class _Stopped(Exception):
    """The fast path recorded the step but claimed nothing: the chain goes on by message."""


def _handle_failure(
    rt: Runtime,
    dispatch: Dispatch,
    step: Step[object],
    claim: Claim,
    exc: Exception,
    *,
    duration_ms: float,
    policy: retry.RetryPolicy,
) -> Outcome:
    verdict = retry.decide(exc, claim.attempt, policy)
    error = _error_json(exc, retryable=verdict.delay is not None)
    if verdict.reason == "attempts_exhausted":
        error["reason"] = verdict.reason
    maybe_applied = retry.may_have_acted(exc)
    # At most once: the provider ignores keys and may have acted, so repeating could do it
    # twice. Exactly once, giving up after transient errors: no attempt got a definite
    # answer, so an effect may exist (the provider's key makes a replay safe).
    unknown = (step.delivery is Delivery.AT_MOST_ONCE and maybe_applied) or (
        verdict.reason == "attempts_exhausted" and step.effect is not None
    )
    failure = Failure(
        error=error,
        retry_in=None if unknown else verdict.delay,
        duration_ms=duration_ms,
        outcome_unknown=unknown,
        reason=_reason(verdict.reason, unknown and verdict.delay is not None),
    )
    return _record_failure(rt, dispatch, claim, failure)


def _reason(verdict: str, cut_short: bool) -> DeadLetterReason:
    """Why a failed attempt ends the job (`cut_short`: it would have been retried, but may
    have acted)."""
    if cut_short:
        return DeadLetterReason.OUTCOME_UNKNOWN
    if verdict == "attempts_exhausted":
        return DeadLetterReason.ATTEMPTS_EXHAUSTED
    return DeadLetterReason.PERMANENT


def _record_failure(rt: Runtime, dispatch: Dispatch, claim: Claim, failure: Failure) -> Outcome:
    try:
        recorded = rt.ledger.record_failure(claim, failure)
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **_log(claim)})
        return Outcome.FENCED
    if failure.retry_in is None:
        logger.error(
            "step failed for good: %s",
            _message(failure.error),
            extra={"action": "dead_letter", **_log(claim)},
        )
        return Outcome.DEAD_LETTERED
    logger.warning(
        "step failed, retrying in %.2fs: %s",
        failure.retry_in,
        _message(failure.error),
        extra={"action": "retry", **_log(claim)},
    )
    if recorded.job_state is not JobState.RUNNING:
        return Outcome.INACTIVE
    dispatch.retry_later(failure.retry_in)


def _error_json(exc: BaseException, *, retryable: bool) -> dict[str, JSON]:
    error: dict[str, JSON] = {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "retryable": retryable,
    }
    if not retryable:
        error["traceback"] = "".join(traceback.format_exception(exc))[-8000:]
    return error


def _message(error: JSON) -> str:
    return str(error.get("message", "")) if isinstance(error, dict) else str(error)


def _log(claim: Claim) -> dict[str, object]:
    return {
        "job_id": str(claim.job_id),
        "step": claim.step,
        "key": claim.key,
        "attempt": claim.attempt,
    }
