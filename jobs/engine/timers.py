"""The timer loop: fires due timers (`ledger.timers`), each once, moving its job past its
wait step (a retry's or a limit's timer: sending its step again) and publishing after the
commit; the sweeper resends a firing (or a signal) whose publish was lost. Also when a job
reaching a wait step is due, what it waits for, and which retries wait as timers."""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final, Protocol
from uuid import UUID

from config.settings import CrashPoint
from jobs.engine.dispatch import Dispatch, ItemDispatch, SendsMany
from jobs.engine.runtime import Runtime
from jobs.errors import UnknownPipeline
from jobs.pipelines import Step, registry
from jobs.retry import RetryPolicy
from jobs.waits import Wait
from ledger import JSON, DueTimer, FiredTimer, SignalWait
from ledger.wait_outbox import ResendRoute

logger = logging.getLogger(__name__)

#: Timers fired per transaction; a loop goes on at once while rounds come back full.
FIRE_BATCH: Final = 500
#: Seconds between looks for due timers while none are: the loop's lateness is at most
#: about this, plus the time to fire a round.
POLL_INTERVAL: Final = 0.2
#: The same on the embedded SQLite ledger, where every look takes the file's one write lock
#: (transactions begin IMMEDIATE): five looks a second made the demo's 200 orders take 14 s
#: instead of 9.
EMBEDDED_POLL_INTERVAL: Final = 1.0
#: Seconds to wait after a failed round (the database or the broker is likely down).
_BACKOFF: Final = 2.0
#: Fired rounds that may wait for their publish before the loop waits too (back-pressure).
_ROUNDS_UNPUBLISHED: Final = 2


def waits_as_timer(delay: float | None, policy: RetryPolicy, timer_after: float) -> bool:
    """Whether a retry `delay` seconds away waits as a timer row rather than as a message
    with a countdown, which a worker holds unacknowledged until it is due (Redis gives it to
    another worker after its visibility timeout, RabbitMQ closes the channel after its
    `consumer_timeout`): when longer than `timer_after` (`ONCELERY_RETRY_TIMER_AFTER`), or
    than the step's `backoff_max` (only a provider's `Retry-After` asks for more), so that
    a countdown never outlasts what the sweeper's stall time allows for."""
    return delay is not None and delay > min(timer_after, policy.backoff_max)


def wait_or_error(
    wait: Wait[object], context: Mapping[str, JSON], results: Mapping[str, JSON], then: str | None
) -> tuple[datetime | timedelta, SignalWait | None] | dict[str, JSON]:
    """When a job reaching `wait` now times out and what signal it waits for (`then`: the
    step after the wait), or why that cannot be said (a field missing or not a time, a
    function that raised: an error for the job's dead letter)."""
    try:
        return wait.due(context, results), wait.signal_wait(context, then)
    except Exception as exc:  # noqa: BLE001 - a user's `until`, `timeout` or key may raise anything
        return {"type": type(exc).__name__, "message": str(exc)[:2000], "retryable": False}


def step_after(pipeline: str, step: str) -> str | None:
    """The step a job of `pipeline` moves on to when its wait at `step` ends (None: the wait
    was the last step).

    Raises:
        LookupError: the pipeline (redeclared since) has no such step.
    """
    try:
        following: Step[object] | None = registry.get(pipeline).next_step(step)
    except (UnknownPipeline, ValueError):
        raise LookupError(f"pipeline {pipeline!r} has no step {step!r}") from None
    return following.name if following is not None else None


def _route(timer: DueTimer) -> str | None:
    """The step a fired timer moves its job to: a `LookupError` (see `step_after`)
    dead-letters the job rather than block the loop on it."""
    return step_after(timer.pipeline, timer.step)


def fire_round(rt: Runtime, dispatch: Dispatch, *, limit: int = FIRE_BATCH) -> int:
    """Fire up to `limit` due timers of the declared pipelines and publish their jobs' next
    steps; how many fired. A publish that fails stays in the outbox (`resend_unsent`)."""
    fired = _fire(rt, limit)
    _publish(rt, dispatch, fired)
    return len(fired)


def _fire(rt: Runtime, limit: int) -> list[FiredTimer]:
    """Fire up to `limit` due timers in one transaction (committed on return)."""
    pipelines = [pipeline.name for pipeline in registry]
    fired = rt.timers.fire_due(limit=limit, pipelines=pipelines, route=_route)
    for each in fired:
        rt.crash(CrashPoint.AFTER_FIRE, each.step, str(each.job_id))
    if fired:
        logger.info(
            "%d timers fired, at most %.3fs late",
            len(fired),
            max(each.late for each in fired),
            extra={"action": "timers_fired"},
        )
    return fired


def _publish(rt: Runtime, dispatch: Dispatch, fired: Sequence[FiredTimer]) -> None:
    """Publish the steps fired timers moved their jobs to, and mark those sent."""
    by_step: dict[tuple[str, str, bool], list[FiredTimer]] = defaultdict(list)
    for each in fired:
        if not each.item_id:
            by_step[(each.pipeline, each.next_step, each.resend)].append(each)
    sent: list[int] = send_items_again(dispatch, [each for each in fired if each.item_id])
    for (pipeline, step, resend), group in by_step.items():
        job_ids = [str(each.job_id) for each in group]
        if isinstance(dispatch, SendsMany) and not resend:
            unsent = set(dispatch.send_many(pipeline, step, job_ids))
        else:
            # A retry (or a limit's wait) goes on the retry queue, as a repeat (claimed even
            # when read-only).
            unsent = set()
            for job_id in job_ids:
                try:
                    dispatch.send(pipeline, step, job_id, resend=resend)
                except Exception as exc:  # noqa: BLE001 - left in the outbox
                    logger.warning("step of %s after its timer not sent: %s", job_id, exc)
                    unsent.add(job_id)
        sent.extend(each.id for each in group if str(each.job_id) not in unsent)
    rt.timers.mark_sent(sent)


def send_items_again(dispatch: Dispatch, waited: list[FiredTimer]) -> list[int]:
    """Send again the map items whose limit timers fired, on the retry queue; the ids of the
    timers sent (the others stay in the outbox)."""
    sent: list[int] = []
    items: dict[tuple[str, str, str], list[FiredTimer]] = defaultdict(list)
    for each in waited:
        items[(each.pipeline, each.step, str(each.job_id))].append(each)
    for (pipeline, step, job_id), group in items.items():
        if not isinstance(dispatch, ItemDispatch):
            continue
        item_ids = [each.item_id for each in group]
        unsent = set(dispatch.send_items(pipeline, step, job_id, item_ids, resend=True))
        sent.extend(each.id for each in group if each.item_id not in unsent)
    return sent


class _WaitOutbox(Protocol):
    """A ledger whose rows are the outbox of moves past a wait (`TimerLedger`,
    `SignalLedger`)."""

    def take_unsent(
        self, *, older_than: float, limit: int, pipelines: Sequence[str], route: ResendRoute
    ) -> list[tuple[int, UUID, str, str, str]]: ...

    def undo_sent(self, rows: Sequence[int], /) -> None: ...


def resend_unsent(rt: Runtime, dispatch: Dispatch, outbox: _WaitOutbox, *, after: str) -> int:
    """Send again the step that moves past a wait sent (the step after it, or a retried or
    limited step itself, or the map item a limit timer sent) when its publish was not
    confirmed within `relay_after` seconds (the mover died between its commit and the
    publish) and its job is still there: `outbox` is `rt.timers` or `rt.signals` (`after`:
    `timer` or `signal`, for the logs). How many were sent. A copy that was not lost after
    all is absorbed by the ledger."""
    pipelines = [pipeline.name for pipeline in registry]
    taken = outbox.take_unsent(
        older_than=rt.settings.relay_after,
        limit=FIRE_BATCH,
        pipelines=pipelines,
        route=resent_step,
    )
    failed: list[int] = []
    for row, job_id, pipeline, step, item_id in taken:
        try:
            if item_id:
                # An item alone, never its whole map step (as `send_items_again`).
                if not isinstance(dispatch, ItemDispatch) or dispatch.send_items(
                    pipeline, step, str(job_id), [item_id], resend=True
                ):
                    raise RuntimeError(f"item {item_id!r} not sent")
            else:
                dispatch.send(pipeline, step, str(job_id), resend=True)
        except Exception as exc:  # noqa: BLE001 - back in the outbox for the next sweep
            logger.warning("resend of %s after its %s not sent: %s", job_id, after, exc)
            failed.append(row)
            continue
        logger.warning(
            "resent the step after a %s",
            after,
            extra={"action": f"{after}_resent", "job_id": str(job_id), "step": step},
        )
    outbox.undo_sent(failed)
    return len(taken) - len(failed)


def resent_step(pipeline: str, step: str, again: bool) -> str | None:
    """The step a move past `step` sent: `step` itself for a retry or a limit's wait
    (`again`), else the step after it (`LookupError`: the pipeline has no such step any
    more)."""
    return step if again else step_after(pipeline, step)


def timer_loop(
    rt: Runtime, dispatch: Dispatch, stop: threading.Event, *, interval: float | None = None
) -> None:
    """Fire due timers until `stop` is set: round after round while they come back full,
    else every `interval` seconds (by default `POLL_INTERVAL` on Postgres,
    `EMBEDDED_POLL_INTERVAL` on SQLite). Several loops may run at once (each timer fires
    once).

    A round's publish runs in a thread of its own while the loop fires the next: a broker
    slow to confirm (RabbitMQ on a busy machine) delayed every round after it, and so the
    firing of timers already due. At most `_ROUNDS_UNPUBLISHED` rounds wait to be
    published; their timers are fired, in the outbox until then."""
    if interval is None:
        postgres = rt.engine.dialect.name == "postgresql"
        interval = POLL_INTERVAL if postgres else EMBEDDED_POLL_INTERVAL
    unpublished: queue.Queue[list[FiredTimer] | None] = queue.Queue(_ROUNDS_UNPUBLISHED)
    publisher = threading.Thread(
        target=_publish_rounds, args=(rt, dispatch, unpublished), name="oncelery-timer-publish"
    )
    publisher.start()
    try:
        while not stop.is_set():
            try:
                fired = _fire(rt, FIRE_BATCH)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a bad round
                logger.warning("timer round failed: %s", exc, extra={"action": "timer_error"})
                stop.wait(_BACKOFF)
                continue
            if fired:
                unpublished.put(fired)
            if len(fired) < FIRE_BATCH:
                stop.wait(interval)
    finally:
        unpublished.put(None)
        publisher.join()


def _publish_rounds(
    rt: Runtime, dispatch: Dispatch, rounds: queue.Queue[list[FiredTimer] | None]
) -> None:
    while (fired := rounds.get()) is not None:
        try:
            _publish(rt, dispatch, fired)
        except Exception as exc:  # noqa: BLE001 - unmarked rows stay in the outbox
            logger.warning("timer publish failed: %s", exc, extra={"action": "timer_error"})
