"""A run of a map step's items (one message's): each claimed, acted on, recorded — and
counted by the fan-in — by the step protocol, on its own key; expansions recorded with
their item; the join handed on by the record that settles the map's last item."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from uuid import UUID

from config.settings import CrashPoint
from jobs.engine.dispatch import Dispatch, ItemDispatch
from jobs.engine.fan_out import hand_on_join, publish_items
from jobs.engine.records import failure_of
from jobs.engine.run_state import Outcome, StepTimer, error_json, log_fields
from jobs.engine.runtime import Runtime
from jobs.maps import Expand, ItemContext, MapStep
from jobs.outside import watching
from jobs.pipelines import Delivery, Pipeline
from ledger import (
    JSON,
    AlreadySucceeded,
    DeadLetterReason,
    Failure,
    FingerprintMismatch,
    InFlight,
    ItemClaim,
    ItemFound,
    ItemRecorded,
    ItemSettled,
    JobInactive,
    LeaseLost,
    LedgerError,
    LimitBusy,
    NewItem,
    OutcomeUnknown,
)

logger = logging.getLogger(__name__)

#: Seconds between looks at an item whose key another owner holds.
_IN_FLIGHT_POLL = 1.0
#: How long an item that acted may wait for its record while the message's next items act.
RECORD_WITHIN = 0.05


class ItemRun:
    """One message's items of a job's map step."""

    def __init__(
        self,
        rt: Runtime,
        dispatch: Dispatch,
        pipeline: Pipeline[object],
        step: MapStep[object],
        job_id: str,
        timer: StepTimer | None,
    ) -> None:
        self.rt, self.dispatch, self.pipeline, self.step = rt, dispatch, pipeline, step
        self.job_id, self.timer = job_id, timer
        following = pipeline.next_step(step.name)
        self.next_step = following.name if following else None
        self.max_failed = step.settled_failures()
        #: Whether this run sent the join again (once a message is enough).
        self.rejoined = False

    def label(self, item_id: str) -> str:
        """What crash points match an item by: its job id, then its item id between slashes
        (a rule's `/7/` is item 7 alone, of any job)."""
        return f"{self.job_id}/{item_id}/"

    def send_later(self, item_ids: Sequence[str], delay: float) -> None:
        """Send items again after `delay` seconds, on the retry queue."""
        if isinstance(self.dispatch, ItemDispatch):
            self.dispatch.send_items(
                self.pipeline.name,
                self.step.name,
                self.job_id,
                item_ids,
                resend=True,
                countdown=delay,
            )

    def after_record(self, recorded: ItemRecorded) -> None:
        """Publish what a record expanded into, and the join if it settled the map (even if
        the items' publish failed: they are in the outbox, the join is not)."""
        try:
            publish_items(
                self.rt, self.dispatch, self.pipeline, self.step, self.job_id, recorded.children
            )
        finally:
            hand_on_join(self.dispatch, self.pipeline, self.step, self.job_id, recorded.joined)

    def settled(self, found: ItemSettled) -> Outcome:
        """An item found settled (redelivered, re-driven), or not in the map. If its job
        waits at the join, the run that joined the map may have died before publishing it:
        publish it again (as a step's redelivery after its record does; a second copy is
        absorbed by the join's claim), once per message."""
        if found.state is None:
            return Outcome.INACTIVE
        if self.rejoined or self.next_step is None or found.current_step != self.next_step:
            return Outcome.DUPLICATE
        self.rejoined = True
        log = {"job_id": self.job_id, "step": self.step.name}
        logger.info("map joined; sending its join again", extra={"action": "rejoin", **log})
        try:
            self.dispatch.send(self.pipeline.name, self.next_step, self.job_id)
        except Exception as exc:  # noqa: BLE001 - recorded in Postgres: the sweeper sends it
            logger.warning(
                "join not published (%s); the sweeper will send it",
                exc,
                extra={"action": "join_unsent", **log},
            )
        return Outcome.DUPLICATE


def run_items(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: MapStep[object],
    job_id: str,
    item_ids: Sequence[str],
    *,
    timer: StepTimer | None = None,
    repeat: bool = False,
) -> list[Outcome]:
    """Run the items of one message (claims in one transaction, records in as few as the
    acts allow); each item's outcome, in order. At most once, each item is claimed just
    before it acts and recorded at once: a key claimed but not acted on looks, once its
    worker is dead, exactly like one that acted (`unknown`), so a message holds at most one
    such key at a time. So does a `repeat` (a message redelivered, perhaps because an item
    killed its worker, or sent again): an item that kills its worker every time then takes
    no other item's attempts with it, and is dead-lettered alone once its attempts run out."""
    run = ItemRun(rt, dispatch, pipeline, step, job_id, timer)
    if len(set(item_ids)) != len(item_ids):
        # A message names each item once; one that does not runs each once.
        unique = list(dict.fromkeys(item_ids))
        ran = dict(
            zip(
                unique,
                run_items(rt, dispatch, pipeline, step, job_id, unique, timer=timer, repeat=repeat),
                strict=True,
            )
        )
        return [ran[item_id] for item_id in item_ids]
    limits = rt.limits_for(pipeline.name, step)
    # A rate limit's token is taken in the claim: each item is claimed just before it acts.
    paced = limits is not None and limits.rate is not None
    if step.delivery is Delivery.AT_MOST_ONCE or repeat or paced:
        return [outcome for item_id in item_ids for outcome in _run_group(run, [item_id])]
    return _run_group(run, item_ids)


def _run_group(run: ItemRun, item_ids: Sequence[str]) -> list[Outcome]:
    """Claim items together, then act on and record each."""
    rt, step, job_id = run.rt, run.step, run.job_id
    for item_id in item_ids:
        rt.crash(CrashPoint.BEFORE_CLAIM, step.name, run.label(item_id))
    found = rt.maps.claim_items(
        UUID(job_id),
        step.name,
        item_ids,
        takeover_expired=takes_over_items(step),
        limits=rt.limits_for(run.pipeline.name, step),
    )
    outcomes: dict[int, Outcome] = {}
    claims: list[tuple[int, ItemClaim]] = []
    for index, (item_id, each) in enumerate(zip(item_ids, found, strict=True)):
        verdict = _verdict(run, item_id, each)
        if isinstance(verdict, Outcome):
            outcomes[index] = verdict
        else:
            claims.append((index, verdict))
    held = [claim for _, claim in claims]
    rt.leases.hold(held)
    try:
        _act_and_record(run, claims, outcomes)
    finally:
        rt.leases.release(held)
    return [outcomes.get(index, Outcome.INTERRUPTED) for index in range(len(item_ids))]


def takes_over_items(step: MapStep[object]) -> bool:
    """Whether an item's claim may take over a key whose owner's lease ran out: not for an
    at-most-once item, whose expired key may have acted (it is unknown instead)."""
    return step.delivery is not Delivery.AT_MOST_ONCE


def _act_and_record(
    run: ItemRun, claims: list[tuple[int, ItemClaim]], outcomes: dict[int, Outcome]
) -> None:
    acted: list[tuple[int, ItemClaim, JSON, Sequence[NewItem]]] = []
    oldest = 0.0
    for index, claim in claims:
        if run.rt.leases.lost(claim):
            logger.warning(
                "lease lost while waiting", extra={"action": "fenced", **log_fields(claim)}
            )
            outcomes[index] = Outcome.FENCED
            continue
        done = _act(run, claim)
        if isinstance(done, Outcome):
            outcomes[index] = done
            continue
        result, children, duration_ms = done
        acted.append((index, claim, result, children))
        oldest = oldest if len(acted) > 1 else time.monotonic()
        if _records_now(run.step, duration_ms, oldest):
            outcomes.update(_record(run, acted))
            acted = []
    outcomes.update(_record(run, acted))


def _records_now(step: MapStep[object], duration_ms: float, oldest: float) -> bool:
    """Whether the items that acted are recorded before the next acts, as a batch's steps
    are (`jobs.engine.run`): at most once at once (a kill before the record leaves the item
    `unknown`), read-only items together, any other once an act was slow or the oldest
    unrecorded one waited `RECORD_WITHIN` (a kill meanwhile leaves their keys held until
    their leases run out)."""
    if step.delivery is Delivery.AT_MOST_ONCE:
        return True
    if step.delivery is Delivery.READ_ONLY:
        return False
    return duration_ms / 1000 >= RECORD_WITHIN or time.monotonic() - oldest >= RECORD_WITHIN


def _verdict(  # noqa: PLR0911 - one answer per thing a claim can find
    run: ItemRun, item_id: str, found: ItemFound | LedgerError
) -> ItemClaim | Outcome:
    """What an item's claim found: the claim to act on, or how this run of the item ends."""
    rt, step = run.rt, run.step
    log = {"job_id": run.job_id, "step": step.name, "item_id": item_id}
    if isinstance(found, ItemClaim):
        return found
    if isinstance(found, ItemSettled):
        return run.settled(found)
    if isinstance(found, JobInactive):
        logger.info("job is %s; item not run", found.state, extra={"action": "skip", **log})
        return Outcome.INACTIVE
    if isinstance(found, LimitBusy):
        return _wait_for_limit(run, item_id, found)
    if isinstance(found, InFlight):
        run.send_later([item_id], min(found.retry_in, _IN_FLIGHT_POLL + random.random() / 2))
        return Outcome.RETRYING
    if isinstance(found, AlreadySucceeded):
        # Another job's item under the same key (the same request): its result, counted.
        recorded = rt.maps.adopt_item(found, item_id, next_step=run.next_step)
        run.after_record(recorded)
        return Outcome.DUPLICATE
    if isinstance(found, OutcomeUnknown | FingerprintMismatch):
        return _dead_letter_unclaimed(run, item_id, found)
    raise found


def _wait_for_limit(run: ItemRun, item_id: str, busy: LimitBusy) -> Outcome:
    """An item its limit refused (nothing claimed): it waits as a timer of its own."""
    rules = run.rt.limits_for(run.pipeline.name, run.step)
    if rules is None:  # (its limits were taken with the claim: they are there)
        raise TypeError(f"map step {run.step.name!r} has no limits to wait for")
    run.rt.limits.wait(busy, rules, item_id=item_id)
    return Outcome.WAITING


def _dead_letter_unclaimed(
    run: ItemRun, item_id: str, found: OutcomeUnknown | FingerprintMismatch
) -> Outcome:
    """Dead-letter an item whose key cannot be claimed: its owner vanished between acting and
    recording (at most once), or the key was first used for another item."""
    if isinstance(found, FingerprintMismatch):
        error = error_json(found, retryable=False)
        reason, owner, attempts = DeadLetterReason.FINGERPRINT_MISMATCH, None, 0
    else:
        error = {
            "type": "OutcomeUnknown",
            "message": "owner vanished between acting and recording",
            "retryable": False,
        }
        reason, owner, attempts = DeadLetterReason.OUTCOME_UNKNOWN, found.owner, found.attempts
    recorded = run.rt.maps.dead_letter_item(
        (UUID(run.job_id), run.step.name, item_id, found.key),
        error,
        reason=reason,
        mark_unknown=owner,
        attempts=attempts,
        max_failed=run.max_failed,
        next_step=run.next_step,
    )
    if recorded is None:  # its owner recorded late, or another took it over: look again
        run.send_later([item_id], _IN_FLIGHT_POLL)
        return Outcome.RETRYING
    logger.error(
        "item dead-lettered: %s", reason, extra={"action": "dead_letter", "key": found.key}
    )
    run.after_record(recorded)
    return Outcome.DEAD_LETTERED


def _act(run: ItemRun, claim: ItemClaim) -> tuple[JSON, Sequence[NewItem], float] | Outcome:
    """Act on an item: its result, the items it expands into and how long it took; or how
    the attempt ended."""
    rt, step = run.rt, run.step
    policy = rt.retry_policy_for(run.pipeline.name, step)
    if claim.attempt > policy.max_attempts:
        # Only crashed attempts get here: an item that kills its worker every time.
        failure = Failure(
            error={
                "type": "worker_lost",
                "retryable": False,
                "message": f"{claim.attempt - 1} attempts ended without a record",
            },
            retry_in=None,
            outcome_unknown=step.effect is not None,
            reason=DeadLetterReason.WORKER_LOST,
        )
        return _record_failure(run, claim, failure)
    ctx = ItemContext(
        job_id=run.job_id,
        pipeline=run.pipeline.name,
        step=step.name,
        key=claim.key,
        attempt=claim.attempt,
        item_id=claim.item_id,
        item=claim.item,
        context=claim.context,
        results=claim.results,
        resources=rt.resources_for(run.pipeline),
    )
    rt.crash(CrashPoint.AFTER_CLAIM, step.name, run.label(claim.item_id))
    if claim.not_before is not None:
        # The claim took its rate limit's token ahead: the request goes out at its time.
        time.sleep(max(0.0, claim.not_before - time.monotonic()))
    limit = run.timer(rt.time_limit_for(run.pipeline, step)) if run.timer else nullcontext()
    started = time.monotonic()
    try:
        with watching() as watch, limit:
            out = step.each(ctx)
            result = out.result if isinstance(out, Expand) else out
            json.dumps(result)
            children = _children(step, run.pipeline.name, claim, out)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
        duration_ms = (time.monotonic() - started) * 1000
        failure = failure_of(
            step, claim.attempt, exc, duration_ms=duration_ms, policy=policy, sent=watch.sent > 0
        )
        longest = rt.settings.retry_timer_after
        if failure.retry_in is not None and failure.retry_in > longest:
            # An item's retry is a countdown (no timer of its own): never longer than the
            # sweeper's stall time allows for (`Settings.stalled_after`).
            failure = dataclasses.replace(failure, retry_in=longest)
        return _record_failure(run, claim, failure)
    rt.crash(CrashPoint.AFTER_ACT, step.name, run.label(claim.item_id))
    return result, children, (time.monotonic() - started) * 1000


def _children(step: MapStep[object], pipeline: str, claim: ItemClaim, out: object) -> list[NewItem]:
    if not isinstance(out, Expand):
        return []
    step_key = claim.key.removesuffix(f"/{claim.item_id}")
    return step.new_items(pipeline, step_key, list(out.items))


def _record_failure(run: ItemRun, claim: ItemClaim, failure: Failure) -> Outcome:
    try:
        recorded = run.rt.maps.record_item_failure(
            claim, failure, max_failed=run.max_failed, next_step=run.next_step
        )
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **log_fields(claim)})
        return Outcome.FENCED
    if failure.retry_in is not None:
        logger.warning(
            "item failed, retrying in %.2fs",
            failure.retry_in,
            extra={"action": "retry", **log_fields(claim)},
        )
        run.send_later([claim.item_id], failure.retry_in)
        return Outcome.RETRYING
    logger.error("item failed for good", extra={"action": "dead_letter", **log_fields(claim)})
    run.after_record(recorded)
    return Outcome.DEAD_LETTERED


def _record(
    run: ItemRun, acted: list[tuple[int, ItemClaim, JSON, Sequence[NewItem]]]
) -> dict[int, Outcome]:
    """Record the items that acted (one transaction), then hand on what each record says."""
    if not acted:
        return {}
    answers = run.rt.maps.record_items(
        [(claim, result, children) for _, claim, result, children in acted],
        next_step=run.next_step,
    )
    outcomes: dict[int, Outcome] = {}
    for (index, claim, _, _), answer in zip(acted, answers, strict=True):
        if isinstance(answer, LeaseLost):
            logger.warning("%s", answer, extra={"action": "fenced", **log_fields(claim)})
            outcomes[index] = Outcome.FENCED
            continue
        if isinstance(answer, LedgerError):
            # Acted, but its result (or what it expanded into) cannot be stored: a person
            # must look, and an effect may exist.
            failure = Failure(
                error=error_json(answer, retryable=False),
                retry_in=None,
                outcome_unknown=run.step.effect is not None,
                reason=DeadLetterReason.PERMANENT,
            )
            outcomes[index] = _record_failure(run, claim, failure)
            continue
        run.rt.crash(CrashPoint.AFTER_RECORD, run.step.name, run.label(claim.item_id))
        run.after_record(answer)
        run.rt.crash(CrashPoint.AFTER_PUBLISH, run.step.name, run.label(claim.item_id))
        outcomes[index] = Outcome.SUCCEEDED if answer.counted else Outcome.DUPLICATE
    return outcomes
