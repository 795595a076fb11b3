"""The verdict on what a claim (or a read) found: the claim to act on, or how this run of the
job ends — a key in flight elsewhere, a limit to wait for, an outcome unknown, a duplicate
absorbed, a dead letter for a key reused or a step the job cannot run."""

from __future__ import annotations

import logging
import random
from uuid import UUID

from jobs.engine.run_state import Outcome, Run, claim_alone, error_json, step_limits
from jobs.engine.step_messages import no_such_job
from jobs.engine.timers import wait_or_error
from jobs.maps import is_map
from jobs.pipelines import Step
from jobs.waits import Wait
from ledger import (
    JSON,
    AlreadySucceeded,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    FingerprintMismatch,
    InFlight,
    JobInactive,
    JobState,
    LedgerError,
    LimitBusy,
    OutcomeUnknown,
    Reading,
    RetryPending,
    StatementRejected,
    StepNotInJob,
)

logger = logging.getLogger(__name__)

#: Seconds between looks at a key another owner holds (at most the rest of its lease).
_IN_FLIGHT_POLL = 1.0


def verdict_on_found(
    run: Run, step: Step[object], job_id: str, found: ClaimOutcome | Reading | LedgerError
) -> Claim | Reading | Outcome:
    """What a claim or a read found: a claim or a reading to act on, or how this run of
    the job ends."""
    if isinstance(found, Reading):
        if found.attempt <= run.rt.retry_policy_for(run.pipeline.name, step).max_attempts:
            return found
        # Its attempts ran out (they died with their workers): only a claim dead-letters it.
        found = claim_alone(run, step, found.job_id)
    return verdict_on_claim(run, step, job_id, found)


def verdict_on_claim(  # noqa: PLR0911 - one answer per thing a claim can find
    run: Run, step: Step[object], job_id: str, found: ClaimOutcome | LedgerError
) -> Claim | Outcome:
    """What a claim found: the claim itself, or how this run of the job ends."""
    rt, dispatch = run.rt, run.dispatch_for(step, job_id)
    job = UUID(job_id)
    log = {"job_id": job_id, "step": step.name}
    if isinstance(found, FingerprintMismatch):
        logger.error("%s", found, extra={"action": "dead_letter", **log, "key": found.key})
        mismatch = error_json(found, retryable=False)
        reason = DeadLetterReason.FINGERPRINT_MISMATCH
        rt.ledger.dead_letter(job, step.name, mismatch, reason=reason, key=found.key)
        return Outcome.DEAD_LETTERED
    if isinstance(found, StepNotInJob | StatementRejected):
        # The job cannot run this step as it stands (a plan without the step, a value the
        # database refuses): no retry can fix that, a person must look.
        logger.error("%s", found, extra={"action": "dead_letter", **log})
        rejected = error_json(found, retryable=False)
        rt.ledger.dead_letter(job, step.name, rejected, reason=DeadLetterReason.PERMANENT)
        return Outcome.DEAD_LETTERED
    if isinstance(found, LedgerError):
        raise found
    if isinstance(found, RetryPending | JobInactive):
        return _not_run(run, step, found)
    if isinstance(found, LimitBusy):
        return wait_for_limit(run, step, found)
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


def _not_run(run: Run, step: Step[object], found: RetryPending | JobInactive) -> Outcome:
    """A claim that must not run its step now: the job's retry waits, or the job is gone."""
    log = {"job_id": str(found.job_id), "step": step.name}
    if isinstance(found, RetryPending):
        # A stray copy (a redelivery, a duplicate publish): the timer sends the retry.
        absorbed = {"action": "absorbed", **log, "key": found.key}
        logger.info("a copy of a step waiting for its retry timer absorbed", extra=absorbed)
    elif found.state is None:  # no such job: said and counted (`jobs.engine.step_messages`)
        no_such_job(run.rt, run.pipeline.name, step.name, str(found.job_id))
    else:
        logger.info("job is %s; step not run", found.state, extra={"action": "skip", **log})
    return Outcome.INACTIVE


def wait_for_limit(run: Run, step: Step[object], busy: LimitBusy) -> Outcome:
    """A claim its limit refused (nothing claimed, no attempt used): the step waits as a
    timer, which the timer loop fires when a token or a slot is likely free."""
    rules = step_limits(run, step)
    if rules is None:  # (its limits were taken with the claim: they are there)
        raise TypeError(f"step {step.name!r} has no limits to wait for")
    wait = run.rt.limits.wait(busy, rules)
    logger.info(
        "waiting for limit %s until %s",
        busy.limit,
        wait.due_at.isoformat(),
        extra={"action": "limit_wait", "job_id": str(busy.job_id), "step": step.name},
    )
    return Outcome.WAITING


def _absorb_duplicate(run: Run, step: Step[object], outcome: AlreadySucceeded) -> Outcome:
    rt, pipeline = run.rt, run.pipeline
    job_id = str(outcome.job_id)
    dispatch = run.dispatch_for(step, job_id)
    following = pipeline.next_step(step.name)
    next_name = following.name if following else None
    if is_map(step) and not outcome.recorded_for_this_job:
        return _map_key_taken(run, step, outcome)
    if is_map(step) and outcome.current_step == step.name:
        # Its items were written with its record and run on their own (the sweeper sends
        # those lost); the fan-in moves the job on, never this message.
        rt.ledger.note_duplicate(outcome)
    elif outcome.recorded_for_this_job and outcome.current_step != step.name:
        rt.ledger.note_duplicate(outcome)
        # A redelivery after the record: the next step's publish may have been lost with
        # the worker, so publish it again; a second copy is absorbed the same way. (A wait
        # step's timer was set with the record: nothing to publish. Had a kept signal moved
        # the job past it, the signals' outbox sends what follows.)
        waits = isinstance(following, Wait)
        if following is not None and outcome.current_step == next_name and not waits:
            dispatch.send(pipeline.name, following.name, job_id)
    elif isinstance(following, Wait):
        _adopt_into_wait(run, step, outcome, following)
    # Another job's result (the same request sent twice), or this job's own result for a
    # step it never moved past (a replay of a step that had in fact succeeded): adopt it.
    elif rt.ledger.adopt_result(outcome, next_step=next_name) is JobState.RUNNING and following:
        dispatch.send(pipeline.name, following.name, job_id)
    logger.info(
        "duplicate absorbed",
        extra={"action": "duplicate", "job_id": job_id, "step": step.name, "key": outcome.key},
    )
    return Outcome.DUPLICATE


def _map_key_taken(run: Run, step: Step[object], outcome: AlreadySucceeded) -> Outcome:
    """A map step key another job recorded: its items are that job's, and this job adopting
    its result would join on none (taking the join's key, shared too, from that job's join).
    Dead-lettered, naming that job: its request is that job's (a person purges it)."""
    holder = run.rt.maps.key_holder(outcome.key)
    message = f"map step key {outcome.key!r} was recorded by job {holder}"
    error: JSON = {"type": "MapKeyTaken", "message": message, "retryable": False}
    log = {"job_id": str(outcome.job_id), "step": step.name, "key": outcome.key}
    logger.error("%s", message, extra={"action": "dead_letter", **log})
    reason = DeadLetterReason.PERMANENT
    run.rt.ledger.dead_letter(outcome.job_id, step.name, error, reason=reason, key=outcome.key)
    return Outcome.DEAD_LETTERED


def _adopt_into_wait(
    run: Run, step: Step[object], outcome: AlreadySucceeded, wait: Wait[object]
) -> None:
    """Adopt a recorded result into a job whose next step waits: its timer is set (or the
    signal kept for it taken: the signals' outbox then sends the step after the wait) in the
    transaction that moves it there — or, its due time or signal untellable, it is
    dead-lettered."""
    ledger = run.rt.ledger
    job = run.rt.store.get_job(outcome.job_id)
    after = run.pipeline.next_step(wait.name)
    then = after.name if after is not None else None
    results = {**job.results, step.name: outcome.result}
    found = wait_or_error(wait, job.context, results, then)
    if isinstance(found, tuple):
        due, signal = found
        ledger.adopt_result(outcome, next_step=wait.name, sleep_until=due, wait=signal)
        return
    if ledger.adopt_result(outcome, next_step=wait.name) is JobState.RUNNING:
        logger.error(
            "wait step cannot tell when or what for: %s",
            found.get("message"),
            extra={"action": "dead_letter", "job_id": str(outcome.job_id), "step": wait.name},
        )
        ledger.dead_letter(outcome.job_id, wait.name, found, reason=DeadLetterReason.PERMANENT)
