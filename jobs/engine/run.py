"""A run of a step, top to bottom: claim (or read) → act → record → hand on, for one task
message's job or for a batch's jobs at the same step; each job's outcome is saved here."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Final
from uuid import UUID

from config.settings import CrashPoint
from jobs.engine.admission import admitted
from jobs.engine.claims import verdict_on_claim, verdict_on_found
from jobs.engine.dispatch import Dispatch
from jobs.engine.fan_out import fan_out
from jobs.engine.records import (
    hand_on,
    handle_failure,
    record,
    record_and_claim,
    record_failure,
)
from jobs.engine.run_state import (
    Acted,
    Outcome,
    Run,
    Stage,
    StepTimer,
    claim_alone,
    guarded,
    log_fields,
    step_limits,
    takes_over,
)
from jobs.engine.runtime import Runtime
from jobs.engine.wait_messages import arm_from_message
from jobs.maps import MapStep, is_map
from jobs.outside import watching
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.waits import Wait
from ledger import (
    JSON,
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    Failure,
    LedgerError,
    Reading,
    ReadResult,
    StepResult,
)

__all__ = ["Outcome", "StepTimer", "run_step", "run_steps"]

logger = logging.getLogger(__name__)


def run_step(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: Step[object],
    job_id: str,
    *,
    repeat: bool = False,
    reading: Reading | None = None,
    timer: StepTimer | None = None,
) -> Outcome:
    """Run one task message's job (and, on the fast path, the steps after it); see DESIGN.md,
    "The step protocol". A retry of the message's own step goes through
    `dispatch.retry_later`, whatever that raises.

    Args:
        repeat: the message may repeat an attempt: redelivered by the broker (its worker may
            have died on it) or sent again (a retry, a re-drive, a replay).
        reading: what the message brought of its job, for a read-only step (the job's first
            message does, see `jobs.engine.dispatch.READING_HEADER`): the step runs on it without
            reading the job, unless the message may repeat an attempt.
        timer: bounds each attempt by its step's time limit (the task's own limit covers
            every step the message may run, on the fast path).
    """
    run = Run(rt, dispatch, pipeline, step, own_message=True, timer=timer)
    run.repeats = frozenset({0}) if repeat else frozenset()
    run.brought = {0: reading} if reading is not None else {}
    [outcome] = _run(run, [job_id])
    return outcome


def run_steps(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: Step[object],
    job_ids: Sequence[str],
    *,
    timer: StepTimer | None = None,
    repeats: Sequence[bool] = (),
    readings: Sequence[Reading | None] = (),
) -> list[Outcome]:
    """Run several jobs at the same step (queued messages a worker took together, see
    `jobs.worker.batching`), each as `run_step` would — claimed, acted on, recorded, handed
    on, retried or dead-lettered on its own — with the ledger's statements shared per stage
    (one transaction on Postgres); each job's outcome, in order. A job that must wait goes
    back to the broker as a message of its own (`dispatch.send`).

    Args:
        timer: bounds each attempt by its step's time limit (nothing else does in a batch).
        repeats: for each job, whether its message may repeat an attempt (as `run_step`).
        readings: for each job, what its message brought (as `run_step`), if anything.
    """
    run = Run(rt, dispatch, pipeline, step, own_message=False, timer=timer)
    run.repeats = frozenset(index for index, repeat in enumerate(repeats) if repeat)
    run.brought = {index: found for index, found in enumerate(readings) if found is not None}
    return _run(run, job_ids)


def _run(run: Run, job_ids: Sequence[str]) -> list[Outcome]:
    step = run.first
    if isinstance(step, Wait):
        # No worker runs a wait: its message is a stale copy, or its job has no timer yet.
        return [arm_from_message(run.rt, run.dispatch, run.pipeline, step, j) for j in job_ids]
    try:
        for job_id in job_ids:
            run.rt.crash(CrashPoint.BEFORE_CLAIM, step.name, job_id)
        found = _claim_or_read(run, [UUID(job_id) for job_id in job_ids])
        found_by_job = list(zip(range(len(job_ids)), job_ids, found, strict=True))
        stage: Stage | None = Stage(step, found_by_job)
        while stage is not None:
            stage = _run_stage(run, stage)
    except Exception:
        if run.own_message:
            raise
        # A statement for the whole batch failed (the database stayed away, say): the jobs
        # it left without an outcome go back to the broker; the ledger knows where each is.
        logger.exception("batch of %s interrupted", step.name, extra={"action": "batch_failed"})
    finally:
        run.rt.leases.release(run.held)
    return [run.outcomes.get(index, Outcome.INTERRUPTED) for index in range(len(job_ids))]


def _claim_or_read(run: Run, jobs: list[UUID]) -> list[ClaimOutcome | Reading | LedgerError | None]:
    """Claim the run's step for its jobs — or, for a read-only step, read them: running
    it needs no claim, and a job that may run it unclaimed is just read (or not even that,
    when its message brought the reading). A batch's at-most-once step is claimed job by
    job, just before each acts (None here)."""
    step, ledger = run.first, run.rt.ledger
    if _claims_one_by_one(run, step):
        return [None] * len(jobs)
    readings: list[Reading | None] = [None] * len(jobs)
    first_tries = [index for index in range(len(jobs)) if index not in run.repeats]
    # A step before a wait is claimed even when read-only: its record sets the timer, in
    # the record of a claim. So is a step with limits: its claim takes them.
    before_wait = isinstance(run.pipeline.next_step(step.name), Wait)
    limits = step_limits(run, step)
    unclaimed = (
        step.delivery is Delivery.READ_ONLY
        and not is_map(step)
        and not before_wait
        and limits is None
    )
    if unclaimed and first_tries and ledger.reads_unclaimed:
        to_read = []
        for index in first_tries:
            brought = run.brought.get(index)
            if brought is not None and brought.job_id == jobs[index] and brought.step == step.name:
                readings[index] = brought
            else:
                to_read.append(index)
        if to_read:
            read = ledger.read_steps([jobs[index] for index in to_read], step.name)
            for index, reading in zip(to_read, read, strict=True):
                readings[index] = reading
    to_claim = [job for job, reading in zip(jobs, readings, strict=True) if reading is None]
    claimed = iter(
        ledger.claim_steps(to_claim, step.name, takeover_expired=takes_over(step), limits=limits)
    )
    return [reading if reading is not None else next(claimed) for reading in readings]


def _run_stage(run: Run, stage: Stage) -> Stage | None:
    """Act on what the stage's claims found; the next stage on the fast path. The claims'
    leases are kept (`jobs.engine.leases`) while the stage's jobs wait their turn and act."""
    step, leases = stage.step, run.rt.leases
    waiting: deque[tuple[int, Claim | Reading | None]] = deque()
    job_ids = {index: job_id for index, job_id, _ in stage.found}
    for index, job_id, found in stage.found:
        verdict = (
            None if found is None else guarded(run, verdict_on_found, run, step, job_id, found)
        )
        if verdict is None or isinstance(verdict, Claim | Reading):
            waiting.append((index, verdict))
        else:
            run.outcomes[index] = verdict
    run.hold([claim for _, claim in waiting])
    acted: list[Acted] = []
    following: list[Stage] = []
    oldest = 0.0
    while waiting:
        index, waited = waiting.popleft()
        claim = waited or _claim_now(run, step, job_ids[index])
        if isinstance(claim, Outcome):
            run.outcomes[index] = claim
            continue
        if isinstance(claim, Claim) and leases.lost(claim):
            # Taken over while it waited its turn (its lease ran out unrenewed): another
            # run has the key now.
            logger.warning(
                "lease lost while waiting", extra={"action": "fenced", **log_fields(claim)}
            )
            run.outcomes[index] = Outcome.FENCED
            continue
        answer = guarded(run, _act, run, step, claim)
        if isinstance(answer, Outcome):
            run.outcomes[index] = answer
            continue
        acted.append(Acted(index, answer))
        oldest = oldest if len(acted) > 1 else time.monotonic()
        if waiting and _records_now(step, answer, oldest):
            following.extend(_record(run, step, acted))
            acted = []
    following.extend(_record(run, step, acted))
    if not following:
        return None
    return Stage(following[0].step, [each for stage in following for each in stage.found])


#: How long a job of a batch that acted may wait for its record while the batch's next jobs
#: act, in seconds: a kill meanwhile leaves its key held until its lease runs out (then its
#: provider's key absorbs the repeat), so the wait is kept short.
RECORD_WITHIN: Final = 0.05


def _records_now(step: Step[object], last: StepResult | ReadResult, oldest: float) -> bool:
    """Whether a batch records the jobs that acted before its next job acts: a step whose
    effect a kill could leave behind unrecorded is recorded promptly — an at-most-once step
    at once (a kill before its record leaves it `unknown` for a person), any other step with
    an effect once an act was slow or the oldest unrecorded one waited `RECORD_WITHIN`. A
    read-only step's jobs are recorded together."""
    if step.delivery is Delivery.READ_ONLY:
        return False
    if step.delivery is Delivery.AT_MOST_ONCE:
        return True
    slow = (last.duration_ms or 0.0) / 1000 >= RECORD_WITHIN
    return slow or time.monotonic() - oldest >= RECORD_WITHIN


def _record(run: Run, step: Step[object], acted: list[Acted]) -> list[Stage]:
    """Record the jobs that acted and hand them on: the next step's stage on the fast path, if
    any. Their outcomes are saved here, before anything is published."""
    if not acted:
        return []
    if isinstance(step, MapStep):
        run.outcomes.update(fan_out(run, step, acted))
        return []
    following = run.pipeline.next_step(step.name)
    if isinstance(following, Wait):
        # The record sets the job's timer; nothing is published: the timer loop (or a
        # signal) hands on — but for jobs that found their signal kept and moved past the
        # wait at once: the step after it is published here.
        outcomes, signalled = record(run, step, acted, following)
        run.outcomes.update(outcomes)
        after = run.pipeline.next_step(following.name)
        if after is not None and signalled:
            job_ids = [job_id for _, job_id in signalled]
            unsent = set(hand_on(run, step, after, job_ids))
            # Those not sent stay in the signals' outbox, for the sweeper.
            sent = [UUID(job_id) for job_id in job_ids if job_id not in unsent]
            run.rt.signals.mark_sent(sent, following.name)
        _published(run, step, acted)
        return []
    if following is not None and run.rt.settings.fast_path:
        if not _claims_one_by_one(run, following):
            return _record_and_claim(run, step, acted, following)
        # Recorded without the next claim: each job claims it just before it acts.
        outcomes, going_on = record(run, step, acted, following)
        run.outcomes.update(outcomes)
        _published(run, step, acted)
        return [Stage(following, [(index, job_id, None) for index, job_id in going_on])]
    outcomes, going_on = record(run, step, acted, following)
    run.outcomes.update(outcomes)
    if following is not None and going_on:
        hand_on(run, step, following, _admitted(run, following, going_on))
    _published(run, step, acted)
    return []


def _admitted(run: Run, following: Step[object], going_on: list[tuple[int, str]]) -> list[str]:
    """The recorded jobs to send on to `following` now: all, unless it has limits, whose
    keys' backlogs wait in line in the ledger instead (`jobs.engine.admission`)."""
    job_ids = [job_id for _, job_id in going_on]
    rules = step_limits(run, following)
    if rules is None:
        return job_ids
    contexts = run.rt.store.contexts([UUID(job_id) for job_id in job_ids])
    runs = [(job_id, contexts.get(UUID(job_id), {})) for job_id in job_ids]
    return admitted(run.rt.engine, following, rules, runs)


def _record_and_claim(
    run: Run, step: Step[object], acted: list[Acted], following: Step[object]
) -> list[Stage]:
    outcomes, unclaimed, stage = record_and_claim(run, step, acted, following)
    run.outcomes.update(outcomes)
    for job_id in unclaimed:
        run.dispatch_for(step, job_id).send(run.pipeline.name, following.name, job_id)
    if stage is None:
        return []
    # Claimed now, acted on once this stage is done: their leases are kept meanwhile.
    run.hold([found for _, _, found in stage.found])
    return [stage]


def _published(run: Run, step: Step[object], acted: list[Acted]) -> None:
    for each in acted:
        if run.outcomes.get(each.index) is Outcome.SUCCEEDED:
            run.rt.crash(CrashPoint.AFTER_PUBLISH, step.name, each.job_id)


def _claims_one_by_one(run: Run, step: Step[object]) -> bool:
    """Whether a run claims `step` for each job just before it acts, rather than for all
    its jobs at once: an at-most-once step in a batch (a key claimed but not yet acted on
    looks, once its worker is killed, exactly like one that acted — `unknown` — so a batch
    holds at most one such key at a time), or a rate-limited one (a token is taken in the
    claim: the provider must see the request then, not after the batch's jobs before it)."""
    if run.own_message or is_map(step):
        return False
    limits = step_limits(run, step)
    return step.delivery is Delivery.AT_MOST_ONCE or (
        limits is not None and limits.rate is not None
    )


def _claim_now(run: Run, step: Step[object], job_id: str) -> Claim | Outcome:
    """Claim a job's step just before it acts (see `_claims_one_by_one`)."""
    run.rt.crash(CrashPoint.BEFORE_CLAIM, step.name, job_id)
    found = guarded(run, claim_alone, run, step, UUID(job_id))
    if isinstance(found, Outcome):
        return found
    run.hold([found])
    verdict = guarded(run, verdict_on_found, run, step, job_id, found)
    if isinstance(verdict, Reading):  # a read-only step is never claimed one by one
        raise TypeError(f"unexpected reading of {step.name}")
    return verdict


def _act(run: Run, step: Step[object], claim: Claim | Reading) -> StepResult | ReadResult | Outcome:
    """Run the step for a claim (or a read-only step's reading): its result, or how the
    failed attempt ended the run."""
    rt = run.rt
    policy = rt.retry_policy_for(run.pipeline.name, step)
    if isinstance(claim, Claim) and claim.attempt > policy.max_attempts:
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
            # (A map step's own run only computed its items: no effect of its own.)
            outcome_unknown=step.effect is not None and not is_map(step),
            reason=DeadLetterReason.WORKER_LOST,
        )
        return record_failure(run, step, claim, failure)
    ctx = StepContext(
        job_id=str(claim.job_id),
        pipeline=run.pipeline.name,
        step=step.name,
        key=claim.key,
        attempt=claim.attempt,
        context=claim.context,
        results=claim.results,
        resources=rt.resources_for(run.pipeline),
        items=functools.partial(rt.maps.item_results, claim.job_id),
    )
    rt.crash(CrashPoint.AFTER_CLAIM, step.name, ctx.job_id)
    if isinstance(claim, Claim) and claim.not_before is not None:
        # The claim took its rate limit's token ahead: the request goes out at its time.
        time.sleep(max(0.0, claim.not_before - time.monotonic()))
    limit = run.timer(rt.time_limit_for(run.pipeline, step)) if run.timer else nullcontext()
    started = time.monotonic()
    try:
        with watching() as watch, limit:
            result = step.run(ctx)
            if not (isinstance(step, MapStep) and isinstance(result, Iterator)):
                json.dumps(result)  # (a map step's stream is checked item by item)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
        duration_ms = (time.monotonic() - started) * 1000
        if isinstance(claim, Reading):
            # A failed attempt is recorded on a claimed key, counted and fenced as any.
            verdict = verdict_on_claim(run, step, ctx.job_id, claim_alone(run, step, claim.job_id))
            if isinstance(verdict, Outcome):
                return verdict
            claim = verdict
        return handle_failure(
            run, step, claim, exc, duration_ms=duration_ms, policy=policy, sent=watch.sent > 0
        )
    duration_ms = (time.monotonic() - started) * 1000
    rt.crash(CrashPoint.AFTER_ACT, step.name, ctx.job_id)
    if isinstance(claim, Reading):
        return ReadResult(claim, result, duration_ms)
    return StepResult(claim, result, duration_ms)
