"""A map step's record (the fan-out): its items written with its key's record in one
transaction as its run yields them, then published from the outbox in messages of several
items; and the hand-on of the join, by the one transaction that settled a map's last item."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Final
from uuid import UUID

from config.settings import CrashPoint
from jobs.engine.dispatch import Dispatch, ItemDispatch
from jobs.engine.records import handle_failure, record_failure
from jobs.engine.run_state import Acted, Outcome, Run, error_json, log_fields
from jobs.engine.runtime import Runtime
from jobs.maps import MapStep
from jobs.pipelines import Pipeline
from ledger import (
    JSON,
    DeadLetterReason,
    Failure,
    JobState,
    LeaseLost,
    NewItem,
    StepResult,
)
from ledger.errors import ItemConflict

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


class _Unreadable(Exception):
    """What reading a map step's items raised (its generator's own error, or an item the
    ledger cannot take), told apart from the ledger's errors."""


def _read(items: Iterable[NewItem]) -> Iterator[NewItem]:
    try:
        yield from items
    except Exception as exc:
        raise _Unreadable(str(exc)) from exc


class _Items:
    """A list's items, read afresh each time (a retried transaction writes them again)."""

    def __init__(
        self, step: MapStep[object], pipeline: str, step_key: str, given: list[JSON]
    ) -> None:
        self._read = functools.partial(step.stream_items, pipeline, step_key, given)

    def __iter__(self) -> Iterator[NewItem]:
        return _read(self._read())


def _fan_out_one(
    run: Run, step: MapStep[object], done: StepResult, next_step: str | None
) -> Outcome:
    rt, claim = run.rt, done.claim
    job_id = str(claim.job_id)
    given: object = done.result
    items: Iterable[NewItem]
    if isinstance(given, list):
        items = _Items(step, run.pipeline.name, claim.key, given)
    elif isinstance(given, Iterator):
        items = _read(step.stream_items(run.pipeline.name, claim.key, given))
    else:
        failure = Failure(
            error=error_json(
                TypeError(f"map step {step.name!r} must return a list or an iterator of items"),
                retryable=False,
            ),
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
            replayable=isinstance(given, list),
        )
    except LeaseLost as exc:
        logger.warning("%s", exc, extra={"action": "fenced", **log_fields(claim)})
        return Outcome.FENCED
    except (_Unreadable, ItemConflict) as exc:
        # Nothing was written: the attempt failed as if its run had raised.
        cause = exc.__cause__ if isinstance(exc, _Unreadable) else exc
        assert isinstance(cause, Exception)
        policy = rt.retry_policy_for(run.pipeline.name, step)
        return handle_failure(
            run, step, claim, cause, duration_ms=done.duration_ms or 0.0, policy=policy, sent=False
        )
    logger.info(
        "map step fanned out into %d items",
        fanned.added,
        extra={"action": "fanned_out", **log_fields(claim)},
    )
    rt.crash(CrashPoint.AFTER_RECORD, step.name, job_id)
    if fanned.added:
        publish_items(rt, run.dispatch, run.pipeline, step, job_id, _outbox(rt, job_id, step))
    hand_on_join(run.dispatch, run.pipeline, step, job_id, fanned.joined)
    rt.crash(CrashPoint.AFTER_PUBLISH, step.name, job_id)
    return Outcome.SUCCEEDED


def _outbox(rt: Runtime, job_id: str, step: MapStep[object]) -> Iterator[list[str]]:
    """A map's items in its outbox, `PUBLISH_SLICE` at a time in item order (read from the
    ledger, so a map of 100,000 items is never one list here)."""
    after = ""
    while page := rt.maps.outbox_page(UUID(job_id), step.name, after=after, limit=PUBLISH_SLICE):
        yield [item_id for item_id, _ in page]
        after = page[-1][1]


def publish_items(
    rt: Runtime,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    step: MapStep[object],
    job_id: str,
    items: Sequence[str] | Iterable[list[str]],
) -> None:
    """Publish items just written (several to a message), `PUBLISH_SLICE` at a time (given
    as their ids, or as slices of them), each slice taken out of the outbox once the broker
    took it; the rest wait there for the sweeper. A publish of several slices first marks
    the outbox's items touched, and again whenever half of `relay_after` passed: the
    sweeper, which sends items left there for `relay_after`, leaves them to it (a long
    record or publish would otherwise send them twice)."""
    slices = _slices(items) if isinstance(items, Sequence) else iter(items)
    log = {"job_id": job_id, "step": step.name}
    if not isinstance(dispatch, ItemDispatch):
        logger.warning(
            "cannot publish items here; the sweeper will send them",
            extra={"action": "items_unsent", **log},
        )
        return
    chunk = next(slices, None)
    touched = -math.inf
    while chunk is not None:
        if len(chunk) >= PUBLISH_SLICE and time.monotonic() - touched > rt.settings.relay_after / 2:
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
        chunk = next(slices, None)


def _slices(item_ids: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(item_ids), PUBLISH_SLICE):
        yield list(item_ids[start : start + PUBLISH_SLICE])


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
