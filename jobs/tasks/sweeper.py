"""The calls' sweeper: in each worker of an app with decorated tasks, a thread re-sends, through
that app, the message kept with a call whose owner died (its lease expired unrecorded) or
that made no progress (a message lost), waiting out the app's backlog first, as the engine's
sweeper does; the ledger absorbs whatever the broker also redelivers. The same thread fires
the calls' retry timers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final
from uuid import UUID

from celery import Celery, Task
from kombu import Queue

from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import ABANDONED_AGAIN_AFTER_LEASES, MAX_BACKLOG_WAIT, backlog_wait
from jobs.tasks.calls import PIPELINE_PREFIX, SPEC_ATTRIBUTE, STEP, CallSpec
from jobs.tasks.messages import resend
from jobs.tasks.revoked import cancel_call, is_revoked
from jobs.tasks.unclaimed import consumed_queues, dead_letter_strays, dead_letter_unclaimed
from ledger import DueTimer, JobToSend

logger = logging.getLogger(__name__)

#: Jobs taken per statement.
_BATCH: Final = 200
#: How long after its record a call whose continuation never appeared is still re-sent, in
#: seconds past the stall time (one kept under another task id — the same call sent twice,
#: its continuation kept from the other — never shows: its call is re-sent every stall time
#: until then, answering its recorded result).
UNFOLLOWED_WITHIN: Final = 3600.0
#: Seconds to wait for the broker before calling the queues' depth unknown.
_TIMEOUT: Final = 3
#: Seconds between two looks for the calls' due retry timers: their lateness is at most
#: about this (a retry waits as a timer only past `ONCELERY_RETRY_TIMER_AFTER`).
TIMER_POLL: Final = 1.0


def decorated_tasks(app: Celery) -> dict[str, CallSpec]:
    """The app's tasks decorated with `exactly_once`, by name."""
    found: dict[str, CallSpec] = {}
    for name, task in list(app.tasks.items()):
        spec = getattr(getattr(task, "run", None), SPEC_ATTRIBUTE, None)
        if isinstance(spec, CallSpec):
            found[name] = spec
    return found


def queued_calls(app: Celery) -> int | None:
    """Messages waiting in the queues the app's workers consume (its default queue unless
    told otherwise); None when the broker cannot say."""
    names = consumed_queues(app)
    total = 0
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=_TIMEOUT)
            for name in names:
                # A fresh channel each time: RabbitMQ closes the channel of a failed passive
                # declare (a queue nobody declared yet).
                try:
                    declared = Queue(name, channel=conn.channel()).queue_declare(passive=True)
                except conn.channel_errors:
                    continue
                # py-amqp and kombu's virtual transports answer (queue, messages, consumers);
                # another answer is an error below: the depth is unknown.
                total += int(declared[1])  # type: ignore[index]
    except Exception:  # noqa: BLE001 - whatever the transport raises, the depth is unknown
        return None
    return total


def sweep_calls(
    rt: Runtime,
    app: Celery,
    *,
    stalled_after: float | None = None,
    queued: Callable[[], int | None] = lambda: 0,
) -> list[str]:
    """Re-send, through `app`, the calls of its decorated tasks whose owner died (at once) or
    that made no progress for `stalled_after` seconds (the settings' by default) plus the
    time the `queued()` messages need to drain (see `jobs.engine.sweeper`) — and, after as
    long, recorded calls whose continuation never appeared, or only in part (fewer calls
    name them as their parent than they hand on to: a hand-on to a group cut short; the
    re-send answers the recorded result, Celery hands on again, and each follower's key
    absorbs its repeat); the job ids sent. Safe in several workers at once (the takes lock
    with SKIP LOCKED). A call re-sent `call_max_resends` times and
    never claimed is dead-lettered instead, as is one of a task the app does not have whose
    message goes to the app's queues, once it waited as long (see `jobs.tasks.unclaimed`)."""
    pipelines = [PIPELINE_PREFIX + name for name in decorated_tasks(app)]
    if not pipelines:
        return []
    store, settings = rt.store, rt.settings
    again = ABANDONED_AGAIN_AFTER_LEASES * settings.step_lease
    sent = _take_all(
        rt, app, lambda: store.take_abandoned(again_after=again, limit=_BATCH, pipelines=pipelines)
    )
    base = settings.stalled_after if stalled_after is None else stalled_after
    depth = queued()
    stalled = base + (MAX_BACKLOG_WAIT if depth is None else backlog_wait(rt, depth, base))
    stalled_calls = partial(store.take_stalled, stalled_after=stalled, pipelines=pipelines)
    sent += _take_all(rt, app, lambda: stalled_calls(limit=_BATCH))
    unfollowed = partial(
        store.take_unfollowed,
        stalled_after=stalled,
        within=stalled + UNFOLLOWED_WITHIN,
        pipelines=pipelines,
    )
    sent += _take_all(rt, app, lambda: unfollowed(limit=_BATCH))
    dead_letter_strays(rt, app, pipelines, older_than=stalled * settings.call_max_resends)
    return sent


def _take_all(rt: Runtime, app: Celery, take: Callable[[], list[JobToSend]]) -> list[str]:
    sent: list[str] = []
    while True:
        taken = take()
        sent.extend(_resend_all(rt, app, taken))
        if len(taken) < _BATCH:
            return sent


def _resend_all(rt: Runtime, app: Celery, taken: Sequence[JobToSend]) -> list[str]:
    job_ids = [job.job_id for job in taken]
    contexts = rt.store.contexts(job_ids)
    # Each take counts: this one too, not sent yet.
    redrives = rt.store.unclaimed_redrives(job_ids)
    sent: list[str] = []
    for job in taken:
        context = contexts.get(job.job_id, {})
        log = {"job_id": str(job.job_id), "step": job.step, "key": context.get("key")}
        task_id = context.get("task_id")
        if is_revoked(task_id):
            cancel_call(rt.store, job.job_id, str(task_id))
            continue
        if redrives.get(job.job_id, 0) > rt.settings.call_max_resends:
            dead_letter_unclaimed(rt, app, job.job_id, context)
            continue
        try:
            resend(app, context.get("message"))
        except Exception as exc:  # noqa: BLE001 - touched: the next sweep tries again
            logger.warning(
                "call not re-sent: %s", exc, extra={"action": "sweep_send_failed", **log}
            )
            # Not a re-send: a long broker outage must not use up the call's re-sends.
            rt.store.note_resend_failed(job.job_id, job.step or STEP, str(exc))
            continue
        logger.warning("re-sent a stalled call", extra={"action": "redrive", **log})
        sent.append(str(job.job_id))
    return sent


def fire_call_timers(rt: Runtime, app: Celery) -> int:
    """Fire the due retry timers of the app's calls (a long retry waits as one, see
    `jobs.engine.timers.waits_as_timer`), re-sending each call's kept message, and re-send
    those whose firing's publish was lost; how many fired. Safe in several workers at once
    (each timer fires once, SKIP LOCKED)."""
    pipelines = [PIPELINE_PREFIX + name for name in decorated_tasks(app)]
    if not pipelines:
        return 0
    fired = rt.timers.fire_due(limit=_BATCH, pipelines=pipelines, route=_no_route)
    unsent = _resend_kept(rt, app, [each.job_id for each in fired])
    rt.timers.mark_sent([each.id for each in fired if each.job_id not in unsent])
    taken = rt.timers.take_unsent(
        older_than=rt.settings.relay_after, limit=_BATCH, pipelines=pipelines, route=_retried
    )
    unsent = _resend_kept(rt, app, [each[1] for each in taken])
    rt.timers.undo_sent([each[0] for each in taken if each[1] in unsent])
    return len(fired)


def _retried(_pipeline: str, step: str, again: bool) -> str:
    # A retry timer's firing sent its call's step again; a call has no other timers.
    if not again:
        raise LookupError(f"a call has no timers but retries (at {step!r})")
    return step


def _no_route(timer: DueTimer) -> str | None:
    # A call's only timers are retries, which stay at their step: nothing to route.
    raise LookupError(f"a call has no {timer.kind} timers")


def _resend_kept(rt: Runtime, app: Celery, job_ids: Sequence[UUID]) -> set[UUID]:
    """Re-send the kept messages of calls whose retry is due; those not sent (a revoked
    call is cancelled instead, and counts as sent)."""
    contexts = rt.store.contexts(job_ids) if job_ids else {}
    unsent: set[UUID] = set()
    for job_id in job_ids:
        context = contexts.get(job_id, {})
        task_id = context.get("task_id")
        log = {"job_id": str(job_id), "step": STEP, "key": context.get("key")}
        if is_revoked(task_id):
            cancel_call(rt.store, job_id, str(task_id))
            continue
        try:
            resend(app, context.get("message"))
        except Exception as exc:  # noqa: BLE001 - left in the outbox for the next round
            logger.warning("call not re-sent after its retry timer: %s", exc, extra=log)
            unsent.add(job_id)
            continue
        logger.info("re-sent a call after its retry timer", extra={"action": "retry_due", **log})
    return unsent


class CallSweeper:
    """Sweeps an app's calls every `interval` seconds, and fires their retry timers every
    `TIMER_POLL` seconds, from a thread of the worker's main process (none of its pool's
    children, busy with the messages it may re-send), on a runtime of its own, built by
    `build` in that thread."""

    def __init__(self, app: Celery, build: Callable[[], Runtime], *, interval: float) -> None:
        self.app, self.build, self.interval = app, build, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oncelery-calls", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        rt: Runtime | None = None
        swept = time.monotonic()
        while not self._stop.wait(min(self.interval, TIMER_POLL)):
            try:
                rt = rt or self.build()
                fire_call_timers(rt, self.app)
                if time.monotonic() - swept < self.interval:
                    continue
                swept = time.monotonic()
                sent = sweep_calls(rt, self.app, queued=lambda: queued_calls(self.app))
            except Exception:
                logger.exception("sweep of calls failed", extra={"action": "sweep_failed"})
                continue
            if sent:
                logger.info("re-sent %d calls", len(sent), extra={"action": "swept"})
        if rt is not None:
            rt.close()


def is_decorated(task: Task[Any, Any]) -> bool:
    """Whether a task's function is decorated with `exactly_once`."""
    return isinstance(getattr(task.run, SPEC_ATTRIBUTE, None), CallSpec)
