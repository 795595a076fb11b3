"""Records: successes (and, on the fast path, the next step's claim in the same round trip),
failures to retry or dead-letter with the verdict on each, and handing recorded jobs on."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from config.settings import CrashPoint
from jobs import retry
from jobs.engine.claims import verdict_on_claim
from jobs.engine.dispatch import SendsMany
from jobs.engine.run_state import (
    Acted,
    Outcome,
    Run,
    Stage,
    claim_alone,
    error_json,
    guarded,
    log_fields,
    message_of,
    step_limits,
    takes_over,
)
from jobs.engine.timers import wait_or_error, waits_as_timer
from jobs.maps import is_map
from jobs.pipelines import Delivery, Step
from jobs.waits import Wait
from ledger import (
    JSON,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    Failure,
    JobState,
    LeaseLost,
    LedgerError,
    Reading,
    ReadResult,
    Recorded,
    SignalWait,
    StatementRejected,
    StepResult,
)

logger = logging.getLogger(__name__)


def record(
    run: Run,
    step: Step[object],
    acted: list[Acted],
    following: Step[object] | None,
) -> tuple[dict[int, Outcome], list[tuple[int, str]]]:
    """Record the stage's successes, moving their jobs to `following`.

    Returns each job's outcome (by place in the run), and the jobs that go on to
    `following` (place in the run, job id), to be handed on — or, when `following` is a
    wait, the jobs a kept signal moved past it at once, to hand on to the step after it.
    """
    rt = run.rt
    answers = _recorded(run, acted, following)
    going_on: list[tuple[int, str]] = []
    outcomes: dict[int, Outcome] = {}
    for each in acted:
        answer = answers[each.index]
        if isinstance(answer, LedgerError) or answer is None:
            outcomes[each.index] = unrecorded(run, step, each, answer)
            continue
        logger.info("step succeeded", extra={"action": "succeeded", **log_fields(each.held)})
        rt.crash(CrashPoint.AFTER_RECORD, step.name, each.job_id)
        waits = isinstance(following, Wait) and not answer.signalled
        if following is not None and answer.job_state is JobState.RUNNING and not waits:
            going_on.append((each.index, each.job_id))
        outcomes[each.index] = Outcome.SUCCEEDED
    return outcomes, going_on


def _recorded(
    run: Run, acted: list[Acted], following: Step[object] | None
) -> dict[int, Recorded | LedgerError | None]:
    """Record successes (moving jobs to `following`), by place in the run; None for a
    read-only step's job that had moved on meanwhile."""
    ledger = run.rt.ledger
    next_step = following.name if following else None
    claimed = [each for each in acted if isinstance(each.done, StepResult)]
    read = [each for each in acted if isinstance(each.done, ReadResult)]
    answers: dict[int, Recorded | LedgerError | None] = {}
    if claimed and isinstance(following, Wait):
        answers.update(_recorded_into_wait(run, claimed, following))
    elif claimed:
        done = [each.done for each in claimed if isinstance(each.done, StepResult)]
        records = ledger.record_successes(done, next_step=next_step)
        answers.update(zip([each.index for each in claimed], records, strict=True))
    if read:
        reads = [each.done for each in read if isinstance(each.done, ReadResult)]
        for each, answer in zip(
            read, ledger.record_reads(reads, next_step=next_step, claim_next=False), strict=True
        ):
            answers[each.index] = answer[0] if isinstance(answer, tuple) else answer
    return answers


def _recorded_into_wait(
    run: Run, claimed: list[Acted], wait: Wait[object]
) -> dict[int, Recorded | LedgerError]:
    """Record successes that move their jobs to a wait step, each with its timer (or the
    signal kept for it) in the same transaction. A job whose due time or signal key cannot
    be told (its `until` field is not a time, say) is recorded without and dead-lettered at
    the wait step."""
    ledger = run.rt.ledger
    after = run.pipeline.next_step(wait.name)
    then = after.name if after is not None else None
    timed: list[tuple[Acted, StepResult, datetime | timedelta, SignalWait | None]] = []
    untimed: list[tuple[Acted, StepResult, dict[str, JSON]]] = []
    for each in claimed:
        done = each.done
        assert isinstance(done, StepResult)
        results = {**done.claim.results, done.claim.step: done.result}
        found = wait_or_error(wait, done.claim.context, results, then)
        if isinstance(found, tuple):
            timed.append((each, done, *found))
        else:
            untimed.append((each, done, found))
    answers: dict[int, Recorded | LedgerError] = {}
    if timed:
        records = ledger.record_successes(
            [done for _, done, _, _ in timed],
            next_step=wait.name,
            sleep_until=[due for _, _, due, _ in timed],
            waits=[signal for _, _, _, signal in timed],
        )
        answers.update(zip([each.index for each, _, _, _ in timed], records, strict=True))
    for each, done, error in untimed:
        [recorded] = ledger.record_successes([done], next_step=wait.name)
        answers[each.index] = recorded
        if isinstance(recorded, Recorded) and recorded.job_state is JobState.RUNNING:
            logger.error(
                "wait step cannot tell when or what for: %s",
                message_of(error),
                extra={"action": "dead_letter", "job_id": each.job_id, "step": wait.name},
            )
            reason = DeadLetterReason.PERMANENT
            ledger.dead_letter(done.claim.job_id, wait.name, error, reason=reason)
    return answers


def hand_on(run: Run, step: Step[object], following: Step[object], job_ids: list[str]) -> list[str]:
    """Publish the next step of recorded jobs: together when there are several (one wait for
    the broker's confirms); a job whose message the broker did not take waits for the
    sweeper, its step recorded. Returns those jobs."""
    if len(job_ids) == 1 or not isinstance(run.dispatch, SendsMany):
        for job_id in job_ids:
            run.dispatch_for(step, job_id).send(run.pipeline.name, following.name, job_id)
        return []
    unsent = run.dispatch.send_many(run.pipeline.name, following.name, job_ids)
    for job_id in unsent:
        logger.warning(
            "next step not published; the sweeper will send it",
            extra={"action": "send_failed", "job_id": job_id, "step": following.name},
        )
    return unsent


def record_and_claim(
    run: Run, step: Step[object], acted: list[Acted], following: Step[object]
) -> tuple[dict[int, Outcome], list[str], Stage | None]:
    """The fast path: record the stage's successes and claim their next step in one round
    trip, then run that step here instead of publishing it — one broker message per job
    instead of one per step. Every step is still claimed and recorded, so a crash resumes
    from the ledger.

    Returns the outcome of each job that ends here (by place in the run), the jobs
    whose next step was not claimed yet must be handed on (their claim will sort it out),
    and the stage of those whose next step was claimed (or refused: its verdict tells).
    """
    rt = run.rt
    for each in acted:
        # The next step's claim rides on this step's record, so "before its claim" is here.
        rt.crash(CrashPoint.BEFORE_CLAIM, following.name, each.job_id)
    answers = _recorded_and_claimed(run, acted, following)
    found: list[tuple[int, str, ClaimOutcome | Reading | LedgerError]] = []
    outcomes: dict[int, Outcome] = {}
    unclaimed: list[str] = []
    for each in acted:
        answer = answers[each.index]
        if answer is None or isinstance(answer, LeaseLost | StatementRejected):
            outcomes[each.index] = unrecorded(run, step, each, answer)
            continue
        rt.crash(CrashPoint.AFTER_RECORD, step.name, each.job_id)
        rt.crash(CrashPoint.AFTER_PUBLISH, step.name, each.job_id)
        if isinstance(answer, LedgerError):
            # Recorded; the next step's claim is refused, and verdict like any claim.
            found.append((each.index, each.job_id, answer))
            continue
        recorded, outcome = answer
        if outcome is None:
            # Nothing was claimed (an ambiguous earlier commit, or the job stopped): hand the
            # next step to the broker if the job still runs; its claim will sort it out.
            if recorded.job_state is JobState.RUNNING:
                unclaimed.append(each.job_id)
            outcomes[each.index] = Outcome.SUCCEEDED
            continue
        found.append((each.index, each.job_id, outcome))
    return outcomes, unclaimed, Stage(following, found) if found else None


#: A fast-path record's answer: the record and the next step's claim, an error about this
#: job alone, or None (a read-only step whose job had moved on: nothing was written).
_Answer = tuple[Recorded, ClaimOutcome | None] | LedgerError | None


def _recorded_and_claimed(
    run: Run, acted: list[Acted], following: Step[object]
) -> dict[int, _Answer]:
    """Record successes and claim `following` for their jobs, by place in the run: one
    transaction for the claimed steps, one for the read-only steps' readings."""
    ledger, takeover = run.rt.ledger, takes_over(following)
    limits = step_limits(run, following)
    answers: dict[int, _Answer] = {}
    claimed = [each for each in acted if isinstance(each.done, StepResult)]
    if claimed:
        done = [each.done for each in claimed if isinstance(each.done, StepResult)]
        records = ledger.record_and_claim_next_steps(
            done, next_step=following.name, takeover_expired=takeover, limits=limits
        )
        answers.update(zip([each.index for each in claimed], records, strict=True))
    read = [each for each in acted if isinstance(each.done, ReadResult)]
    if read:
        reads = [each.done for each in read if isinstance(each.done, ReadResult)]
        read_records = ledger.record_reads(
            reads,
            next_step=following.name,
            claim_next=True,
            takeover_expired=takeover,
            limits=limits,
        )
        answers.update(zip([each.index for each in read], read_records, strict=True))
    return answers


def unrecorded(run: Run, step: Step[object], acted: Acted, error: LedgerError | None) -> Outcome:
    """A success the ledger would not record: fenced out, recorded by another run (a
    read-only step), or its result refused."""
    held = acted.held
    if error is None and isinstance(held, Reading) and held.assumed:
        # The reading its message brought no longer held: since the job was created, another
        # run tried, holds or did the step (or another job did it, or its key is another
        # request's). A claim tells which, as for any repeat: on the retry queue.
        logger.info(
            "job changed since it was sent; claiming instead",
            extra={"action": "reclaim", **log_fields(held)},
        )
        run.dispatch_for(step, acted.job_id).send(
            run.pipeline.name, step.name, acted.job_id, resend=True
        )
        return Outcome.RETRYING
    if error is None:
        logger.info(
            "step recorded by another run",
            extra={"action": "duplicate", **log_fields(acted.held)},
        )
        return Outcome.DUPLICATE
    if isinstance(error, LeaseLost):
        logger.warning("%s", error, extra={"action": "fenced", **log_fields(acted.held)})
        return Outcome.FENCED
    # The step acted, but its result cannot be stored (Postgres refused it): a person must
    # look, and the effect may exist.
    failure = Failure(
        error=error_json(error, retryable=False),
        retry_in=None,
        outcome_unknown=step.effect is not None,
        reason=DeadLetterReason.PERMANENT,
    )
    claim = acted.done.claim if isinstance(acted.done, StepResult) else None
    if claim is None:
        # Read-only, unclaimed: the failure is recorded on a claim, fenced as any.
        verdict = verdict_on_claim(
            run, step, acted.job_id, claim_alone(run, step, acted.held.job_id)
        )
        if isinstance(verdict, Outcome):
            return verdict
        claim = verdict
    return guarded(run, record_failure, run, step, claim, failure)


def handle_failure(
    run: Run,
    step: Step[object],
    claim: Claim,
    exc: Exception,
    *,
    duration_ms: float,
    policy: retry.RetryPolicy,
    sent: bool,
) -> Outcome:
    """Record a failed attempt: retried, or dead-lettered with its key `failed` — or
    `unknown` when an effect may exist (`sent`: the attempt reported a request that may
    apply one, see `jobs.outside`)."""
    judged = step
    if is_map(step):
        # A map step's own run only computes its items: its delivery and effect are theirs.
        judged = dataclasses.replace(step, delivery=Delivery.EXACTLY_ONCE, effect=None)
    settings = run.rt.settings
    failure = failure_of(
        judged,
        claim.attempt,
        exc,
        duration_ms=duration_ms,
        policy=policy,
        sent=sent,
        retry_after_max=settings.retry_after_max,
    )
    if waits_as_timer(failure.retry_in, policy, settings.retry_timer_after):
        failure = dataclasses.replace(failure, retry_timer=True)
    return record_failure(run, step, claim, failure)


def failure_of(
    step: Step[object],
    attempt: int,
    exc: Exception,
    *,
    duration_ms: float,
    policy: retry.RetryPolicy,
    sent: bool,
    retry_after_max: float | None = None,
) -> Failure:
    """How a failed attempt of `step` (or of one of its items) is recorded: retried after a
    delay, or given up — its key `unknown` when an effect may exist. `retry_after_max`: the
    longest `Retry-After` honoured (None: the policy's `backoff_max`, for a retry that can
    only be a countdown)."""
    verdict = retry.decide(exc, attempt, policy, retry_after_max=retry_after_max)
    error = error_json(exc, retryable=verdict.delay is not None)
    if verdict.reason == "attempts_exhausted":
        error["reason"] = verdict.reason
    maybe_applied = retry.may_have_acted(exc, sent=sent, unapplied_statuses=step.unapplied_statuses)
    # At most once: the provider ignores keys and may have acted, so repeating could do it
    # twice. Exactly once, giving up: an effect may exist (after transient errors no attempt
    # got a definite answer), and the key must say so; the provider's key makes a replay
    # safe.
    gives_up = verdict.delay is None
    unknown = (step.delivery is Delivery.AT_MOST_ONCE and maybe_applied) or (
        step.effect is not None
        and gives_up
        and (maybe_applied or verdict.reason == "attempts_exhausted")
    )
    return Failure(
        error=error,
        retry_in=None if unknown else verdict.delay,
        duration_ms=duration_ms,
        outcome_unknown=unknown,
        reason=_reason(verdict.reason, unknown and verdict.delay is not None),
    )


def _reason(verdict: str, cut_short: bool) -> DeadLetterReason:
    """Why a failed attempt ends the job (`cut_short`: it would have been retried, but may
    have acted)."""
    if cut_short:
        return DeadLetterReason.OUTCOME_UNKNOWN
    if verdict == "attempts_exhausted":
        return DeadLetterReason.ATTEMPTS_EXHAUSTED
    return DeadLetterReason.PERMANENT


def record_failure(run: Run, step: Step[object], claim: Claim, failure: Failure) -> Outcome:
    try:
        recorded = run.rt.ledger.record_failure(claim, failure)
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **log_fields(claim)})
        return Outcome.FENCED
    if failure.retry_in is None:
        logger.error(
            "step failed for good: %s",
            message_of(failure.error),
            extra={"action": "dead_letter", **log_fields(claim)},
        )
        return Outcome.DEAD_LETTERED
    logger.warning(
        "step failed, retrying in %.2fs%s: %s",
        failure.retry_in,
        " (a timer)" if failure.retry_timer else "",
        message_of(failure.error),
        extra={"action": "retry", **log_fields(claim)},
    )
    if recorded.job_state is not JobState.RUNNING:
        return Outcome.INACTIVE
    if failure.retry_timer:
        # Its timer, set with the record, sends the step again when due: no message waits.
        return Outcome.RETRYING
    run.dispatch_for(step, str(claim.job_id)).retry_later(failure.retry_in)
