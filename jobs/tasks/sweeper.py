"""The calls' sweeper: in each worker of an app with decorated tasks, a thread re-sends, through
that app, the message kept with a call whose owner died (its lease expired unrecorded) or
that made no progress (a lost retry); the ledger absorbs whatever the broker also redelivers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from celery import Celery, Task

from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import ABANDONED_AGAIN_AFTER_LEASES
from jobs.tasks.calls import PIPELINE_PREFIX, CallSpec
from jobs.tasks.decorator import SPEC_ATTRIBUTE
from ledger import JSON, JobToSend

logger = logging.getLogger(__name__)

#: Jobs taken per statement.
_BATCH: Final = 200


def decorated_tasks(app: Celery) -> dict[str, CallSpec]:
    """The app's tasks decorated with `exactly_once`, by name."""
    found: dict[str, CallSpec] = {}
    for name, task in list(app.tasks.items()):
        spec = getattr(getattr(task, "run", None), SPEC_ATTRIBUTE, None)
        if isinstance(spec, CallSpec):
            found[name] = spec
    return found


def resend(app: Celery, message: JSON) -> None:
    """Publish a kept message through `app` (its broker, its routes): the call with its
    task id and the canvas that follows it."""
    if not isinstance(message, dict):
        raise TypeError(f"not a kept message: {message!r}")
    app.signature(message).apply_async()


def sweep_calls(rt: Runtime, app: Celery, *, stalled_after: float | None = None) -> list[str]:
    """Re-send, through `app`, the calls of its decorated tasks whose owner died (at once) or
    that made no progress for `stalled_after` seconds (the settings' by default); the job
    ids sent. Safe in several workers at once (the takes lock with SKIP LOCKED)."""
    pipelines = [PIPELINE_PREFIX + name for name in decorated_tasks(app)]
    if not pipelines:
        return []
    store, settings = rt.store, rt.settings
    again = ABANDONED_AGAIN_AFTER_LEASES * settings.step_lease
    stalled = settings.stalled_after if stalled_after is None else stalled_after
    takes: list[Callable[[], list[JobToSend]]] = [
        lambda: store.take_abandoned(again_after=again, limit=_BATCH, pipelines=pipelines),
        lambda: store.take_stalled(stalled_after=stalled, limit=_BATCH, pipelines=pipelines),
    ]
    sent: list[str] = []
    for take in takes:
        while True:
            taken = take()
            sent.extend(_resend_all(rt, app, taken))
            if len(taken) < _BATCH:
                break
    return sent


def _resend_all(rt: Runtime, app: Celery, taken: Sequence[JobToSend]) -> list[str]:
    contexts = rt.store.contexts([job.job_id for job in taken])
    sent: list[str] = []
    for job in taken:
        context = contexts.get(job.job_id, {})
        log = {"job_id": str(job.job_id), "step": job.step, "key": context.get("key")}
        try:
            resend(app, context.get("message"))
        except Exception as exc:  # noqa: BLE001 - touched: the next sweep tries again
            logger.warning(
                "call not re-sent: %s", exc, extra={"action": "sweep_send_failed", **log}
            )
            continue
        logger.warning("re-sent a stalled call", extra={"action": "redrive", **log})
        sent.append(str(job.job_id))
    return sent


class CallSweeper:
    """Sweeps an app's calls every `interval` seconds from a thread of the worker's main
    process (none of its pool's children, busy with the messages it may re-send)."""

    def __init__(self, app: Celery, runtime: Callable[[], Runtime], *, interval: float) -> None:
        self.app, self.runtime, self.interval = app, runtime, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oncelery-calls", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sent = sweep_calls(self.runtime(), self.app)
            except Exception:
                logger.exception("sweep of calls failed", extra={"action": "sweep_failed"})
                continue
            if sent:
                logger.info("re-sent %d calls", len(sent), extra={"action": "swept"})


def is_decorated(task: Task[Any, Any]) -> bool:
    """Whether a task's function is decorated with `exactly_once`."""
    return isinstance(getattr(task.run, SPEC_ATTRIBUTE, None), CallSpec)
