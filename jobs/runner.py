"""Running deliveries of a step: claim → act → record, then hand each job on.

A delivery carries one job (a task message) or several jobs at the same step (queued messages
a worker took together, see `jobs.batching`). The ledger's statements run once per stage for
all of them (one transaction on Postgres), yet each job is claimed, acted on, recorded and
handed on as if it had come alone, and each failure is retried or dead-lettered on its own.

Celery-free on purpose: `jobs/app.py` binds it to tasks through a `Dispatch`, and tests can
drive it with their own.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import NoReturn, ParamSpec, Protocol, TypeVar, runtime_checkable
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
    LedgerError,
    OutcomeUnknown,
    StatementRejected,
    StepNotInJob,
    StepResult,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: Seconds between looks at a key another owner holds (at most the rest of its lease).
_IN_FLIGHT_POLL = 1.0

#: Bounds one attempt of a step in time, given its limit in seconds (a batch's steps run
#: under no task time limit of their own).
StepTimer = Callable[[float], AbstractContextManager[object]]


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


@runtime_checkable
class SendsMany(Protocol):
    """A dispatch that publishes a step of many jobs in one go (`CeleryDispatch`)."""

    def send_many(self, pipeline: str, step: str, job_ids: Sequence[str]) -> list[str]:
        """Publish `step` of each job; the job ids whose publish failed."""


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
    #: A batch could not finish with this job (an unexpected error, the database gone): its
    #: message goes back to the broker, to be delivered again alone.
    INTERRUPTED = "interrupted"


class HandedBack(Exception):
    """A job's step went back to the broker as a message of its own (a retry, or its key was
    busy): this delivery is done with that job."""


class _Continuation:
    """The dispatch of a step that did not come in a message of its own (reached by the fast
    path, or carried in a batch): its "retry later" publishes it as a task of its own."""

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


@dataclass
class _Run:
    """One delivery being run: what all of its jobs share."""

    rt: Runtime
    dispatch: Dispatch
    pipeline: Pipeline[object]
    #: The step the delivery was for.
    first: Step[object]
    #: The delivery is one task message: `dispatch.retry_later` re-sends it.
    own_message: bool
    timer: StepTimer | None
    #: Each job's outcome, by its place in the delivery.
    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def dispatch_for(self, step: Step[object], job_id: str) -> Dispatch:
        """How a job at `step` is handed on from here."""
        if self.own_message and step is self.first:
            return self.dispatch
        return _Continuation(self.dispatch, self.pipeline.name, step.name, job_id)


@dataclass
class _Stage:
    """One step of a delivery's jobs: each job's claim outcome, ready to act on."""

    step: Step[object]
    #: When the claims were asked for: their leases run at least until then + lease.
    claimed_at: float
    #: (place in the delivery, job id, what claiming found).
    found: list[tuple[int, str, ClaimOutcome | LedgerError]]


@dataclass(frozen=True)
class _Acted:
    """A job whose step succeeded, waiting for its record."""

    index: int
    done: StepResult


def run_step(
    rt: Runtime, dispatch: Dispatch, pipeline: Pipeline[object], step: Step[object], job_id: str
) -> Outcome:
    """Run one task message's job (and, on the fast path, the steps after it); see DESIGN.md,
    "The step protocol". A retry of the message's own step goes through
    `dispatch.retry_later`, whatever that raises."""
    run = _Run(rt, dispatch, pipeline, step, own_message=True, timer=None)
    [outcome] = _deliver(run, [job_id])
    return outcome


def run_steps(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: Step[object],
    job_ids: Sequence[str],
    *,
    timer: StepTimer | None = None,
) -> list[Outcome]:
    """Run several jobs at the same step, each as `run_step` would, with the ledger's
    statements shared per stage; each job's outcome, in order. A job that must wait goes
    back to the broker as a message of its own (`dispatch.send`).

    Args:
        timer: bounds each attempt by its step's time limit (nothing else does in a batch).
    """
    return _deliver(_Run(rt, dispatch, pipeline, step, own_message=False, timer=timer), job_ids)


def _deliver(run: _Run, job_ids: Sequence[str]) -> list[Outcome]:
    step = run.first
    try:
        for job_id in job_ids:
            run.rt.crash(CrashPoint.BEFORE_CLAIM, step.name, job_id)
        claimed_at = time.monotonic()
        found = run.rt.ledger.claim_steps(
            [UUID(job_id) for job_id in job_ids], step.name, takeover_expired=_takes_over(step)
        )
        found_by_job = list(zip(range(len(job_ids)), job_ids, found, strict=True))
        stage: _Stage | None = _Stage(step, claimed_at, found_by_job)
        while stage is not None:
            stage = _run_stage(run, stage)
    except Exception:
        if run.own_message:
            raise
        # A statement for the whole batch failed (the database stayed away, say): the jobs
        # it left without an outcome go back to the broker; the ledger knows where each is.
        logger.exception("batch of %s interrupted", step.name, extra={"action": "batch_failed"})
    return [run.outcomes.get(index, Outcome.INTERRUPTED) for index in range(len(job_ids))]


def _run_stage(run: _Run, stage: _Stage) -> _Stage | None:
    """Act on what the stage's claims found; the next stage on the fast path."""
    step = stage.step
    waiting: deque[tuple[int, Claim]] = deque()
    for index, job_id, found in stage.found:
        settled = _guarded(run, _settle, run, step, job_id, found)
        if isinstance(settled, Claim):
            waiting.append((index, settled))
        else:
            run.outcomes[index] = settled
    acted: list[_Acted] = []
    while waiting:
        index, claim = waiting.popleft()
        if not _keep_leases(run, stage, (index, claim), waiting, acted):
            run.outcomes[index] = Outcome.FENCED
            continue
        answer = _guarded(run, _act, run, step, claim)
        if isinstance(answer, Outcome):
            run.outcomes[index] = answer
        else:
            acted.append(_Acted(index, answer))
    if not acted:
        return None
    following = run.pipeline.next_step(step.name)
    if following is not None and run.rt.settings.fast_path:
        return _record_and_claim(run, step, acted, following)
    _record(run, step, acted, following)
    return None


def _guarded(run: _Run, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | Outcome:
    """`call(...)` for one job: handed back to the broker meanwhile, it is retrying. In a
    batch, an error about this job stops this job alone (its message goes back to the
    broker); a task message lets it propagate, as it always did."""
    try:
        return call(*args, **kwargs)
    except HandedBack:
        return Outcome.RETRYING
    except Exception:
        if run.own_message:
            raise
        logger.exception("a job of a batch was interrupted", extra={"action": "job_interrupted"})
        return Outcome.INTERRUPTED


def _keep_leases(
    run: _Run,
    stage: _Stage,
    acting: tuple[int, Claim],
    waiting: deque[tuple[int, Claim]],
    acted: list[_Acted],
) -> bool:
    """Before a job of a batch acts: once half the slack between lease and time limit is
    spent, renew the leases of the whole stage — this job, those still waiting and those
    waiting for their record — so that no key is taken over under the batch. Whether the
    acting job's key is still ours; waiting jobs whose keys are not are taken out, fenced
    (one that acted already finds out when its record is refused)."""
    lease = run.rt.settings.step_lease
    slack = lease - run.rt.time_limit_for(run.pipeline, stage.step)
    if time.monotonic() - stage.claimed_at < slack / 2:
        return True
    renewing = time.monotonic()
    pairs = [acting, *waiting]
    held = run.rt.ledger.renew_leases([claim for _, claim in pairs] + [a.done.claim for a in acted])
    stage.claimed_at = renewing
    waiting.clear()
    for (index, claim), ours in zip(pairs[1:], held[1 : len(pairs)], strict=True):
        if ours:
            waiting.append((index, claim))
        else:
            logger.warning("lease lost while waiting", extra={"action": "fenced", **_log(claim)})
            run.outcomes[index] = Outcome.FENCED
    return held[0]


def _settle(
    run: _Run, step: Step[object], job_id: str, found: ClaimOutcome | LedgerError
) -> Claim | Outcome:
    """What a claim found: the claim itself, or how this delivery of the job ends."""
    rt, dispatch = run.rt, run.dispatch_for(step, job_id)
    job = UUID(job_id)
    log = {"job_id": job_id, "step": step.name}
    if isinstance(found, FingerprintMismatch):
        logger.error("%s", found, extra={"action": "dead_letter", **log, "key": found.key})
        mismatch = _error_json(found, retryable=False)
        reason = DeadLetterReason.FINGERPRINT_MISMATCH
        rt.ledger.dead_letter(job, step.name, mismatch, reason=reason, key=found.key)
        return Outcome.DEAD_LETTERED
    if isinstance(found, StepNotInJob | StatementRejected):
        # The job cannot run this step as it stands (a plan without the step, a value the
        # database refuses): no retry can fix that, a person must look.
        logger.error("%s", found, extra={"action": "dead_letter", **log})
        rejected = _error_json(found, retryable=False)
        rt.ledger.dead_letter(job, step.name, rejected, reason=DeadLetterReason.PERMANENT)
        return Outcome.DEAD_LETTERED
    if isinstance(found, LedgerError):
        raise found
    if isinstance(found, JobInactive):
        logger.info("job is %s; step not run", found.state, extra={"action": "skip", **log})
        return Outcome.INACTIVE
    if isinstance(found, InFlight):
        in_flight = {"action": "in_flight", **log, "key": found.key}
        logger.info("key in flight elsewhere", extra=in_flight)
        # Poll rather than wait out the whole lease: the other owner usually finishes soon.
        dispatch.retry_later(min(found.retry_in, _IN_FLIGHT_POLL + random.random() / 2))
    if isinstance(found, OutcomeUnknown):
        error: JSON = {
            "type": "OutcomeUnknown",
            "message": "owner vanished between acting and recording",
            "retryable": False,
        }
        if not rt.ledger.declare_unknown(found, error):
            # Its owner recorded late, or another took the key over: look again.
            dispatch.retry_later(_IN_FLIGHT_POLL)
        logger.error("outcome unknown", extra={"action": "dead_letter", **log, "key": found.key})
        return Outcome.DEAD_LETTERED
    if isinstance(found, AlreadySucceeded):
        return _absorb_duplicate(run, step, found)
    return found


def _absorb_duplicate(run: _Run, step: Step[object], outcome: AlreadySucceeded) -> Outcome:
    rt, pipeline = run.rt, run.pipeline
    job_id = str(outcome.job_id)
    dispatch = run.dispatch_for(step, job_id)
    following = pipeline.next_step(step.name)
    next_name = following.name if following else None
    if outcome.recorded_for_this_job and outcome.current_step != step.name:
        rt.ledger.note_duplicate(outcome)
        # A redelivery after the record: the next step's publish may have been lost with
        # the worker, so publish it again; a second copy is absorbed the same way.
        if following is not None and outcome.current_step == next_name:
            dispatch.send(pipeline.name, following.name, job_id)
    # Another job's result (the same request sent twice), or this job's own result for a
    # step it never moved past (a replay of a step that had in fact succeeded): adopt it.
    elif rt.ledger.adopt_result(outcome, next_step=next_name) is JobState.RUNNING and following:
        dispatch.send(pipeline.name, following.name, job_id)
    logger.info(
        "duplicate absorbed",
        extra={"action": "duplicate", "job_id": job_id, "step": step.name, "key": outcome.key},
    )
    return Outcome.DUPLICATE


def _act(run: _Run, step: Step[object], claim: Claim) -> StepResult | Outcome:
    """Run the step for a claim: its result, or how the failed attempt ended the delivery."""
    rt = run.rt
    policy = rt.retry_policy_for(run.pipeline.name, step)
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
        return _record_failure(run, step, claim, failure)
    ctx = StepContext(
        job_id=str(claim.job_id),
        pipeline=run.pipeline.name,
        step=step.name,
        key=claim.key,
        attempt=claim.attempt,
        context=claim.context,
        results=claim.results,
        resources=rt.resources_for(run.pipeline),
    )
    rt.crash(CrashPoint.AFTER_CLAIM, step.name, ctx.job_id)
    limit = run.timer(rt.time_limit_for(run.pipeline, step)) if run.timer else nullcontext()
    started = time.monotonic()
    try:
        with limit:
            result = step.run(ctx)
        json.dumps(result)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
        duration_ms = (time.monotonic() - started) * 1000
        return _handle_failure(run, step, claim, exc, duration_ms=duration_ms, policy=policy)
    duration_ms = (time.monotonic() - started) * 1000
    rt.crash(CrashPoint.AFTER_ACT, step.name, ctx.job_id)
    return StepResult(claim, result, duration_ms)


def _record(
    run: _Run, step: Step[object], acted: list[_Acted], following: Step[object] | None
) -> None:
    """Record the stage's successes, then publish each job's next step."""
    rt = run.rt
    next_name = following.name if following else None
    answers = rt.ledger.record_successes([a.done for a in acted], next_step=next_name)
    recorded: list[str] = []
    handing_on: list[str] = []
    for each, answer in zip(acted, answers, strict=True):
        claim, job_id = each.done.claim, str(each.done.claim.job_id)
        if isinstance(answer, LedgerError):
            run.outcomes[each.index] = _unrecorded(run, step, claim, answer)
            continue
        logger.info("step succeeded", extra={"action": "succeeded", **_log(claim)})
        rt.crash(CrashPoint.AFTER_RECORD, step.name, job_id)
        recorded.append(job_id)
        if following is not None and answer.job_state is JobState.RUNNING:
            handing_on.append(job_id)
        run.outcomes[each.index] = Outcome.SUCCEEDED
    if following is not None and handing_on:
        _hand_on(run, step, following, handing_on)
    for job_id in recorded:
        rt.crash(CrashPoint.AFTER_PUBLISH, step.name, job_id)


def _hand_on(run: _Run, step: Step[object], following: Step[object], job_ids: list[str]) -> None:
    """Publish the next step of recorded jobs: together when there are several (one wait for
    the broker's confirms); a job whose message the broker did not take waits for the
    sweeper, its step recorded."""
    if len(job_ids) == 1 or not isinstance(run.dispatch, SendsMany):
        for job_id in job_ids:
            run.dispatch_for(step, job_id).send(run.pipeline.name, following.name, job_id)
        return
    unsent = run.dispatch.send_many(run.pipeline.name, following.name, job_ids)
    for job_id in unsent:
        logger.warning(
            "next step not published; the sweeper will send it",
            extra={"action": "send_failed", "job_id": job_id, "step": following.name},
        )


def _record_and_claim(
    run: _Run, step: Step[object], acted: list[_Acted], following: Step[object]
) -> _Stage | None:
    """The fast path: record the stage's successes and claim their next step in one round
    trip, then run that step here instead of publishing it — one broker message per job
    instead of one per step. Every step is still claimed and recorded, so a crash resumes
    from the ledger."""
    rt = run.rt
    for each in acted:
        # The next step's claim rides on this step's record, so "before its claim" is here.
        rt.crash(CrashPoint.BEFORE_CLAIM, following.name, str(each.done.claim.job_id))
    claimed_at = time.monotonic()
    answers = rt.ledger.record_and_claim_next_steps(
        [a.done for a in acted], next_step=following.name, takeover_expired=_takes_over(following)
    )
    found: list[tuple[int, str, ClaimOutcome | LedgerError]] = []
    for each, answer in zip(acted, answers, strict=True):
        claim, job_id = each.done.claim, str(each.done.claim.job_id)
        if isinstance(answer, LeaseLost | StatementRejected):
            run.outcomes[each.index] = _unrecorded(run, step, claim, answer)
            continue
        rt.crash(CrashPoint.AFTER_RECORD, step.name, job_id)
        rt.crash(CrashPoint.AFTER_PUBLISH, step.name, job_id)
        if isinstance(answer, LedgerError):
            # Recorded; the next step's claim is refused, and settled like any claim.
            found.append((each.index, job_id, answer))
            continue
        recorded, outcome = answer
        if outcome is None:
            # Nothing was claimed (an ambiguous earlier commit, or the job stopped): hand the
            # next step to the broker if the job still runs; its claim will sort it out.
            if recorded.job_state is JobState.RUNNING:
                run.dispatch_for(step, job_id).send(run.pipeline.name, following.name, job_id)
            run.outcomes[each.index] = Outcome.SUCCEEDED
            continue
        found.append((each.index, job_id, outcome))
    return _Stage(following, claimed_at, found) if found else None


def _unrecorded(run: _Run, step: Step[object], claim: Claim, error: LedgerError) -> Outcome:
    """A success the ledger would not record: fenced out, or its result refused."""
    if isinstance(error, LeaseLost):
        logger.warning("%s", error, extra={"action": "fenced", **_log(claim)})
        return Outcome.FENCED
    # The step acted, but its result cannot be stored (Postgres refused it): a person must
    # look, and the effect may exist.
    failure = Failure(
        error=_error_json(error, retryable=False),
        retry_in=None,
        outcome_unknown=step.effect is not None,
        reason=DeadLetterReason.PERMANENT,
    )
    return _guarded(run, _record_failure, run, step, claim, failure)


def _handle_failure(
    run: _Run,
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
    return _record_failure(run, step, claim, failure)


def _reason(verdict: str, cut_short: bool) -> DeadLetterReason:
    """Why a failed attempt ends the job (`cut_short`: it would have been retried, but may
    have acted)."""
    if cut_short:
        return DeadLetterReason.OUTCOME_UNKNOWN
    if verdict == "attempts_exhausted":
        return DeadLetterReason.ATTEMPTS_EXHAUSTED
    return DeadLetterReason.PERMANENT


def _record_failure(run: _Run, step: Step[object], claim: Claim, failure: Failure) -> Outcome:
    try:
        recorded = run.rt.ledger.record_failure(claim, failure)
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
    run.dispatch_for(step, str(claim.job_id)).retry_later(failure.retry_in)


def _takes_over(step: Step[object]) -> bool:
    """Whether a claim of `step` may take over a key whose owner's lease ran out (an
    at-most-once step's expired key may have acted: it is unknown instead)."""
    return step.delivery is Delivery.EXACTLY_ONCE


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
