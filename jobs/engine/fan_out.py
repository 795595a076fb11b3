"""A map step's record (the fan-out): its items written with its key's record in one
transaction, then published in messages of several items; and the hand-on of the join, by
the one transaction that settled a map's last item."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Final
from uuid import UUID

from config.settings import CrashPoint
from jobs.engine.dispatch import Dispatch, ItemDispatch
from jobs.engine.records import record_failure
from jobs.engine.run_state import Acted, Outcome, Run, error_json, log_fields
from jobs.engine.runtime import Runtime
from jobs.maps import MapStep
from jobs.pipelines import Pipeline
from ledger import DeadLetterReason, Failure, JobState, LeaseLost, StepResult

logger = logging.getLogger(__name__)

#: Items published, and taken out of the outbox, at a time.
PUBLISH_SLICE: Final = 1000


def fan_out(run: Run, step: MapStep[object], acted: list[Acted]) -> dict[int, Outcome]:
    """Record a map step for the jobs that ran it: each job's items written with its key's
    record, then published. Each job's outcome, by place in the run."""
    outcomes: dict[int, Outcome] = {}
    following = run.pipeline.next_step(step.name)
    for each in acted:
        if not isinstance(each.done, StepResult):  # a map step is always claimed
            raise TypeError(f"map step {step.name} ran unclaimed")
        outcomes[each.index] = _fan_out_one(
            run, step, each.done, following.name if following else None
        )
    return outcomes


def _fan_out_one(
    run: Run, step: MapStep[object], done: StepResult, next_step: str | None
) -> Outcome:
    rt, claim = run.rt, done.claim
    job_id = str(claim.job_id)
    try:
        if not isinstance(done.result, list):
            raise ValueError(f"map step {step.name!r} must return a list of items")
        items = step.new_items(run.pipeline.name, claim.key, done.result)
    except ValueError as exc:
        failure = Failure(
            error=error_json(exc, retryable=False),
            retry_in=None,
            duration_ms=done.duration_ms,
            reason=DeadLetterReason.PERMANENT,
        )
        return record_failure(run, step, claim, failure)
    try:
        fanned = rt.maps.fan_out(
            claim,
            items,
            policy=str(step.policy),
            next_step=next_step,
            duration_ms=done.duration_ms,
        )
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **log_fields(claim)})
        return Outcome.FENCED
    logger.info(
        "map step fanned out into %d items",
        len(fanned.item_ids),
        extra={"action": "fanned_out", **log_fields(claim)},
    )
    rt.crash(CrashPoint.AFTER_RECORD, step.name, job_id)
    publish_items(rt, run.dispatch, run.pipeline, step, job_id, fanned.item_ids)
    hand_on_join(run.dispatch, run.pipeline, step, job_id, fanned.joined)
    rt.crash(CrashPoint.AFTER_PUBLISH, step.name, job_id)
    return Outcome.SUCCEEDED


def publish_items(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: MapStep[object],
    job_id: str,
    item_ids: Sequence[str],
) -> None:
    """Publish items just written (several to a message), `PUBLISH_SLICE` at a time, each
    slice taken out of the outbox once the broker took it; the rest wait there for the
    sweeper. A publish of several slices first marks the outbox's items touched, and again
    whenever half of `relay_after` passed: the sweeper, which sends items left there for
    `relay_after`, leaves them to it (a long record or publish would otherwise send them
    twice)."""
    if not item_ids:
        return
    log = {"job_id": job_id, "step": step.name}
    if not isinstance(dispatch, ItemDispatch):
        logger.warning(
            "cannot publish items here; the sweeper will send them",
            extra={"action": "items_unsent", **log},
        )
        return
    touched = -math.inf
    for start in range(0, len(item_ids), PUBLISH_SLICE):
        chunk = item_ids[start : start + PUBLISH_SLICE]
        if (
            len(item_ids) > PUBLISH_SLICE
            and time.monotonic() - touched > rt.settings.relay_after / 2
        ):
            touched = time.monotonic()
            rt.maps.touch_outbox(UUID(job_id), step.name)
        try:
            unsent = set(dispatch.send_items(pipeline.name, step.name, job_id, chunk))
        except Exception as exc:  # noqa: BLE001 - they are in the outbox: the sweeper sends them
            logger.warning(
                "items not published (%s); the sweeper will send them",
                exc,
                extra={"action": "items_unsent", **log},
            )
            return
        sent = [item_id for item_id in chunk if item_id not in unsent]
        rt.maps.mark_dispatched(UUID(job_id), step.name, sent)


def hand_on_join(
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: MapStep[object],
    job_id: str,
    joined: JobState | None,
) -> None:
    """Publish the step after a map whose last item this run settled (its transaction was
    the one that moved the job on: no other run publishes it; a lost publish is the
    sweeper's, as for any step)."""
    following = pipeline.next_step(step.name)
    if joined is not JobState.RUNNING or following is None:
        return
    logger.info(
        "map joined; handing on to %s",
        following.name,
        extra={"action": "joined", "job_id": job_id, "step": step.name},
    )
    try:
        dispatch.send(pipeline.name, following.name, job_id)
    except Exception as exc:  # noqa: BLE001 - recorded in Postgres: the sweeper sends it
        logger.warning("join not published (%s); the sweeper will send it", exc)
