"""The sweeper: sends again the current step of unfinished jobs that made no progress in
Postgres (the broker is never trusted to redeliver; the ledger absorbs the duplicates), at once
for what it knows lost, after `stalled_after` (plus any backlog's drain time) for the rest."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from jobs.engine.dispatch import ITEMS_PER_MESSAGE, Dispatch, ItemDispatch
from jobs.engine.enqueue import relay
from jobs.engine.runtime import Runtime
from jobs.engine.timers import resend_unsent
from jobs.pipelines import registry
from ledger import JobToSend

logger = logging.getLogger(__name__)

#: Jobs taken per statement; a sweep goes on until a batch comes back short.
_BATCH = 500
#: Seconds of history that give the pace at which workers drain the queues.
PACE_WINDOW: Final = 60.0
#: How long a job waits to be re-driven while the queues are backlogged (they need longer
#: than `stalled_after` to drain, or nothing drains at all), or the broker cannot say.
MAX_BACKLOG_WAIT: Final = 3600.0
#: Leases after which an abandoned job whose re-drive nobody claimed is sent again.
ABANDONED_AGAIN_AFTER_LEASES: Final = 3


@dataclass(frozen=True)
class QueueLoss:
    """Messages the broker lost: every one handed to it between `after` and `before` seconds
    ago (`after` None: any time before)."""

    before: float
    after: float | None
    #: What showed it, for the log.
    reason: str


class BrokerWatch(Protocol):
    """What the sweeper can learn of the broker beyond its queues' depth."""

    def lost(self) -> QueueLoss | None:
        """The messages the broker lost since the last `seen`, if it knows of any."""

    def seen(self) -> None:
        """Note the broker as it is now: what it lost before is dealt with."""


class BlindWatch:
    """A broker that cannot tell that it lost messages: the stall threshold finds them."""

    def lost(self) -> QueueLoss | None:
        """Never known."""
        return None

    def seen(self) -> None:
        """Nothing to note."""


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    redriven: int
    skipped: int
    job_ids: list[str] = field(default_factory=list)
    #: Jobs sent from the outbox (accepted while the broker was down).
    relayed: int = 0
    #: Seconds added to `stalled_after` for the messages queued ahead (see the module's text).
    backlog_wait: float = 0.0
    #: True when the broker could not say how much is queued, so only jobs stalled for
    #: `MAX_BACKLOG_WAIT` more were re-driven.
    deferred: bool = False
    #: Of `redriven`: jobs whose step's owner died (its lease expired).
    abandoned: int = 0
    #: Of `redriven`: jobs whose message the broker lost (see `QueueLoss`).
    lost: int = 0
    #: Items of map steps sent again: left in the outbox, abandoned, or stalled.
    items: int = 0
    #: Steps after fired timers sent again (their publish was lost with the timer loop).
    timers: int = 0
    #: Steps after signals sent again (their publish was lost with their sender).
    signals: int = 0


# What the sweeper re-drives at once, knowing it lost:
# - abandoned jobs: the current step is `started` under a lease that expired since the job was
#   last touched. A live owner renews its lease while it acts, so its owner is dead;
# - jobs whose message a broker that lost its queues lost (`QueueLoss`: a Redis restarted
#   without the data it held, see `jobs.worker.queues`): those handed to it before the loss
#   and not touched since.
# The rest waits for `stalled_after`. A job waiting behind a backlog looks exactly like a job
# whose message was lost, and re-driving it cannot make it run sooner: the new message queues
# behind the same backlog. Left alone, a backlog longer than `stalled_after` had every waiting
# job re-driven each sweep, which lengthened the backlog (a 10,000-order chaos run never
# converged). So the sweeper first asks how long the queued messages need to drain at the pace
# workers went in the last minute (messages, not history events: on the fast path one message
# runs every step). When that is within `stalled_after`, a job is stalled after
# `stalled_after` plus that time; when it is longer, the queue is backlogged and only jobs
# untouched for `MAX_BACKLOG_WAIT` are re-driven, until it drains. A broker that cannot say
# how much is queued gets the same cap. A lost message is still found: once the messages
# ahead of it are gone, or after an hour of sustained overload or of a broker that cannot tell.


def backlog_wait(rt: Runtime, queued: int, stalled_after: float) -> float:
    """Seconds added to `stalled_after` for `queued` waiting messages: the time they need to
    drain at the pace of the last `PACE_WINDOW` seconds, or `MAX_BACKLOG_WAIT` when that is
    longer than `stalled_after` itself (see above)."""
    if queued <= 0:
        return 0.0
    handled = rt.store.recent_deliveries(window=PACE_WINDOW, fast_path=rt.settings.fast_path)
    # Map steps' items write no history: their messages are counted by the items done.
    handled += math.ceil(rt.maps.recent_items(window=PACE_WINDOW) / ITEMS_PER_MESSAGE)
    drain = queued * PACE_WINDOW / handled if handled else math.inf
    return drain if drain <= stalled_after else MAX_BACKLOG_WAIT


def sweep(
    rt: Runtime,
    dispatch: Dispatch,
    *,
    stalled_after: float | None = None,
    queued: Callable[[], int | None] = lambda: 0,
    watch: BrokerWatch | None = None,
) -> SweepReport:
    """Send again the current step of every abandoned job, of every job whose message the
    broker lost (as `watch` tells), and of every job stalled for `stalled_after` seconds (the
    settings' value by default) plus the time the `queued()` messages need to drain. Safe to
    run in several processes at once.

    When the broker cannot say how much is queued, it is most likely down or restarting
    (every transport we use answers otherwise): only jobs stalled past `MAX_BACKLOG_WAIT` are
    sent, since a re-drive judged without the backlog would resend every waiting job."""
    relayed = relay(rt, dispatch)
    resent_timers = resend_unsent(rt, dispatch, rt.timers, after="timer")
    resent_signals = resend_unsent(rt, dispatch, rt.signals, after="signal")
    # Only the declared pipelines' jobs: a decorated Celery task's are its own app's to send.
    ours = [pipeline.name for pipeline in registry]
    base = stalled_after if stalled_after is not None else rt.settings.stalled_after
    depth = queued()
    if depth is None:
        logger.warning(
            "queue depth unknown (broker unreachable?): re-driving only jobs stalled for %.0fs",
            base + MAX_BACKLOG_WAIT,
            extra={"action": "sweep_deferred"},
        )
        old, skipped = _redrive(
            dispatch,
            lambda n: rt.store.take_stalled(
                stalled_after=base + MAX_BACKLOG_WAIT, limit=n, pipelines=ours
            ),
        )
        return SweepReport(
            len(old),
            skipped,
            old,
            relayed,
            deferred=True,
            timers=resent_timers,
            signals=resent_signals,
        )
    waiting = backlog_wait(rt, depth, base)
    # A re-drive that nobody claimed within a few leases was lost in turn (a killed worker's
    # prefetch, which Redis gives back only after its visibility timeout): sent again — after
    # the backlog's wait too, since behind a backlog it is most likely still queued. Sent
    # again every few leases whatever the backlog, the abandoned jobs of a Postgres restart
    # grew the queue faster than workers drained it (a Redis chaos run stalled behind 67,205
    # re-drives).
    again = ABANDONED_AGAIN_AFTER_LEASES * rt.settings.step_lease + waiting
    abandoned, skipped = _redrive(
        dispatch, lambda n: rt.store.take_abandoned(again_after=again, limit=n, pipelines=ours)
    )
    lost, skipped_lost = _redrive_lost(rt, dispatch, watch or BlindWatch(), ours)
    stalled, skipped_stalled = _redrive(
        dispatch,
        lambda n: rt.store.take_stalled(stalled_after=base + waiting, limit=n, pipelines=ours),
    )
    items = redrive_items(rt, dispatch, stalled_after=base + waiting, pipelines=ours)
    return SweepReport(
        redriven=len(abandoned) + len(lost) + len(stalled),
        skipped=skipped + skipped_lost + skipped_stalled,
        job_ids=abandoned + lost + stalled,
        relayed=relayed,
        backlog_wait=waiting,
        abandoned=len(abandoned),
        lost=len(lost),
        items=items,
        timers=resent_timers,
        signals=resent_signals,
    )


def redrive_items(
    rt: Runtime,
    dispatch: Dispatch,
    *,
    stalled_after: float,
    pipelines: list[str],
    loss: QueueLoss | None = None,
) -> int:
    """Send again the pending items of map steps that look lost — left in the outbox for
    `relay_after`, abandoned by a dead owner, or stalled; or, given a `loss`, handed to the
    broker while it lost them — batch after batch, several to a message; how many were sent.
    The ledger absorbs a copy that was not lost after all."""
    if not isinstance(dispatch, ItemDispatch):
        return 0
    sent = 0
    while True:
        taken = rt.maps.take_lost_items(
            stalled_after=stalled_after,
            relay_after=rt.settings.relay_after,
            limit=_BATCH,
            pipelines=pipelines,
            sent_between=(loss.before, loss.after) if loss is not None else None,
        )
        by_job: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for item in taken:
            by_job[(item.pipeline, item.step, str(item.job_id))].append(item.item_id)
        for (pipeline, step, job_id), item_ids in by_job.items():
            try:
                unsent = dispatch.send_items(pipeline, step, job_id, item_ids, resend=True)
            except Exception as exc:  # noqa: BLE001 - touched: the stall time finds them
                logger.warning("items of %s not re-sent: %s", job_id, exc)
                continue
            sent += len(item_ids) - len(unsent)
            logger.warning(
                "re-drove %d items of %s",
                len(item_ids) - len(unsent),
                step,
                extra={"action": "redrive_items", "job_id": job_id, "step": step},
            )
        if len(taken) < _BATCH:
            return sent


def _redrive_lost(
    rt: Runtime, dispatch: Dispatch, watch: BrokerWatch, pipelines: list[str]
) -> tuple[list[str], int]:
    """Send again the jobs whose message the broker lost, then note the broker as seen (not
    before: a sweep that fails half-way, its database gone, leaves the loss to the next one;
    a job whose send failed was touched, so the stall threshold finds it)."""
    loss = watch.lost()
    sent: list[str] = []
    skipped = 0
    if loss is not None:
        logger.warning(
            "the broker lost queued messages (%s): re-driving what it held",
            loss.reason,
            extra={"action": "queues_lost"},
        )
        sent, skipped = _redrive(
            dispatch,
            lambda n: rt.store.take_sent_between(
                before=loss.before, after=loss.after, limit=n, pipelines=pipelines
            ),
        )
        redrive_items(rt, dispatch, stalled_after=0.0, pipelines=pipelines, loss=loss)
    watch.seen()
    return sent, skipped


def _redrive(dispatch: Dispatch, take: Callable[[int], list[JobToSend]]) -> tuple[list[str], int]:
    """Send the step of every job `take(limit)` hands over, batch after batch until one comes
    back short; the ids sent, and how many could not be."""
    redriven: list[str] = []
    skipped = 0
    while True:
        taken = take(_BATCH)
        for job in taken:
            if job.step is None or job.pipeline not in registry:
                skipped += 1
                logger.error(
                    "stalled job %s cannot be re-driven (pipeline %s, step %s)",
                    job.job_id,
                    job.pipeline,
                    job.step,
                    extra={"action": "sweep_skip", "job_id": str(job.job_id), "step": job.step},
                )
                continue
            try:
                dispatch.send(job.pipeline, job.step, str(job.job_id), resend=True)
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                skipped += 1
                logger.warning(
                    "re-drive of %s not sent: %s",
                    job.job_id,
                    exc,
                    extra={"action": "sweep_send_failed", "job_id": str(job.job_id)},
                )
                continue
            redriven.append(str(job.job_id))
            logger.warning(
                "re-drove stalled job at %s",
                job.step,
                extra={"action": "redrive", "job_id": str(job.job_id), "step": job.step},
            )
        if len(taken) < _BATCH:
            return redriven, skipped
