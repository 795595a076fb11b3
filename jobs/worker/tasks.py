"""The Celery tasks: one per pipeline step (`oncelery.<pipeline>.<step>`), bound as pipelines are
declared, and the sweep, which beat runs on a thread of its own (with the outbox relay and
the timer loop)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import beat_init

from config import SWEEP_TASK, get_settings
from jobs.engine.outbox import relay_forever
from jobs.engine.step_messages import item_task_name, task_name
from jobs.engine.sweeper import SweepReport, sweep
from jobs.engine.timers import timer_loop
from jobs.maps import MapStep
from jobs.pipelines import Pipeline, registry
from jobs.worker import batching, steps
from jobs.worker.app import app, runtime
from jobs.worker.publishing import CeleryDispatch
from jobs.worker.queues import broker_watch, queued_steps

logger = logging.getLogger(__name__)


def _bind(pipeline: Pipeline[object]) -> None:
    for step in pipeline.steps:
        if isinstance(step, MapStep):
            _bind_items(pipeline, step)
        name = task_name(pipeline.name, step.name)
        if steps.declare(pipeline, name, step.name):
            # Celery keeps the first callable registered under a name; it looks its step up
            # when it runs, so it runs the new declaration.
            continue
        # max_retries=None: the ledger counts attempts and decides when to stop, not Celery.
        # A prefork worker runs queued messages of the step in batches (`jobs.worker.batching`);
        # staticmethod: Celery calls the task's `Strategy` with the task as first argument.
        app.task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=None,
            Strategy=staticmethod(batching.strategy),
        )(_step_task())


def _bind_items(pipeline: Pipeline[object], step: MapStep[object]) -> None:
    """A map step's items run as a task of their own, several items to a message (which
    carries them all: no batching of messages)."""
    name = item_task_name(pipeline.name, step.name)
    if steps.declare(pipeline, name, step.name):
        return
    app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)(
        _items_task()
    )


def _items_task() -> Callable[..., list[str]]:
    def run(task: Task[Any, Any], *args: Any, **kwargs: Any) -> list[str]:
        return steps.run_items_message(task, args, kwargs)

    return run


def _step_task() -> Callable[..., str]:
    def run(task: Task[Any, Any], *args: Any, **kwargs: Any) -> str:
        return steps.run_message(task, args, kwargs)

    return run


registry.on_add(_bind)


@app.task(name=SWEEP_TASK, acks_late=False, ignore_result=True)
def sweep_task() -> dict[str, int]:
    """One sweep, for whoever sends it (`celery call oncelery.sweep`); beat sweeps itself."""
    return _sweep_once()


@beat_init.connect
def _sweep_from_beat(**_: Any) -> None:
    # In beat's own process, on a thread of its own: no worker pool, busy with the messages a
    # sweep must re-drive, stands between the schedule and the sweep.
    threading.Thread(target=_sweep_forever, name="oncelery-sweeper", daemon=True).start()
    # And the outbox of callers' transactions (`jobs.enqueue(…, connection=…)`), sent moments
    # after they commit rather than at the next sweep.
    threading.Thread(target=_relay_forever, name="oncelery-relay", daemon=True).start()
    # And the timer loop: due timers fired within `POLL_INTERVAL` of their time (a second on
    # the embedded SQLite ledger).
    threading.Thread(target=_fire_timers_forever, name="oncelery-timers", daemon=True).start()


def _fire_timers_forever() -> None:
    """Fire due timers for as long as beat runs (see `jobs.engine.timers`)."""
    timer_loop(runtime(), CeleryDispatch(), threading.Event())


def _relay_forever() -> None:
    """Relay the outbox for as long as beat runs (see `jobs.engine.outbox`)."""
    relay_forever(runtime(), CeleryDispatch(), threading.Event())


def _sweep_forever() -> None:
    """Sweep every `ONCELERY_SWEEP_INTERVAL` seconds, for as long as beat runs (a sweep that
    fails is logged; the next one tries again)."""
    interval = get_settings().sweep_interval
    while True:
        began = time.monotonic()
        try:
            report = _sweep_once()
        except Exception:
            logger.exception("sweep failed", extra={"action": "sweep_failed"})
        else:
            keys = ("redriven", "relayed", "items", "timers", "signals")
            if any(report[key] for key in keys):
                logger.info("swept: %s", report, extra={"action": "swept"})
            _beat_heartbeat()
        time.sleep(max(0.0, interval - (time.monotonic() - began)))


#: Touched after every sweep that completed: beat's healthcheck (docker-compose.yml) reads its
#: age, which says the sweeper is alive and reaching the ledger, not only that beat runs.
BEAT_HEARTBEAT = "beat-heartbeat"


def _beat_heartbeat() -> None:
    path = get_settings().data_dir / BEAT_HEARTBEAT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        logger.warning("cannot touch %s: %s", path, exc, extra={"action": "heartbeat_failed"})


def _sweep_once() -> dict[str, int]:
    """Re-drive what the sweeper finds (see `jobs.engine.sweeper`); what it did."""
    report: SweepReport = sweep(
        runtime(), CeleryDispatch(), queued=lambda: queued_steps(app), watch=broker_watch(app)
    )
    return {
        "redriven": report.redriven,
        "abandoned": report.abandoned,
        "lost": report.lost,
        "skipped": report.skipped,
        "relayed": report.relayed,
        "items": report.items,
        "timers": report.timers,
        "signals": report.signals,
        "backlog_wait": round(report.backlog_wait),
    }
