"""What a worker of an app with decorated tasks does besides running them: check at start the
Celery settings the calls rely on (a clear warning for each missing one), sweep the calls
from its main process, and close each process's ledger connections when it ends."""

from __future__ import annotations

import logging
from typing import Any, Final

from celery import Celery
from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown

from config import get_settings
from jobs.engine.runtime import Runtime
from jobs.tasks.running import close_runtime
from jobs.tasks.sweeper import CallSweeper, decorated_tasks

logger = logging.getLogger(__name__)

#: Redis gives a dead worker's unacknowledged messages back after its visibility timeout;
#: past this many seconds, a killed worker's calls wait that long (kombu's default: an hour).
REDIS_VISIBILITY_WARN_ABOVE: Final = 600.0

_sweepers: list[CallSweeper] = []


def check_settings(app: Celery) -> list[str]:
    """What is wrong with `app`'s settings for its decorated tasks, one sentence each."""
    problems: list[str] = []
    for name in sorted(decorated_tasks(app)):
        task = app.tasks[name]
        if not task.acks_late:
            problems.append(
                f"task {name}: acks_late is off, so a message a killed worker had taken is "
                f"lost before its call is claimed: set task_acks_late=True (or acks_late=True)"
            )
        if not task.reject_on_worker_lost:
            problems.append(
                f"task {name}: reject_on_worker_lost is off, so a pool child killed mid-call "
                f"has its message acknowledged: set task_reject_on_worker_lost=True"
            )
    if decorated_tasks(app) and not app.conf.task_acks_on_failure_or_timeout:
        problems.append(
            "task_acks_on_failure_or_timeout is off: a dead-lettered call's message would "
            "come back forever; leave it on (the dead letter keeps the call)"
        )
    broker = str(app.conf.broker_url or "")
    if decorated_tasks(app) and broker.startswith(("redis", "rediss")):
        timeout = (app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
        if float(timeout) > REDIS_VISIBILITY_WARN_ABOVE:
            problems.append(
                f"Redis gives a killed worker's messages back after visibility_timeout "
                f"({float(timeout):.0f} s): set broker_transport_options={{'visibility_timeout':"
                f" …}} to a few times your longest task (the ledger absorbs early repeats)"
            )
    return problems


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if not isinstance(app, Celery) or not decorated_tasks(app):
        return
    for problem in check_settings(app):
        logger.warning("oncelery: %s", problem, extra={"action": "settings_check"})
    settings = get_settings()
    sweeper = CallSweeper(
        app, lambda: Runtime.from_settings(settings), interval=settings.sweep_interval
    )
    _sweepers.append(sweeper)
    sweeper.start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    for sweeper in _sweepers:
        sweeper.stop()
    _sweepers.clear()


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    close_runtime()
