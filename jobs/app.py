"""The Celery app: one task per pipeline step (`oncelery.<pipeline>.<step>`), each running
`jobs.runner.run_step`; the per-process runtime, rebuilt after every fork."""

from __future__ import annotations

import logging
import os
from typing import Any, NoReturn

from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Queue

from config import MAIN_QUEUE, RETRY_QUEUE, Settings, celery_config, get_settings, prepare_broker
from jobs.pipelines import Pipeline, registry
from jobs.runner import run_step
from jobs.runtime import Runtime, load_pipelines
from ledger import DatabaseUnavailable

logger = logging.getLogger(__name__)

#: Seconds before a step is tried again when the database could not be reached at all.
_DATABASE_DOWN_DELAY = 5.0


def _configure() -> dict[str, object]:
    # Called by Celery when its configuration is first read: settings errors surface then,
    # not at import, so `oncelery` can report them as one line.
    settings = get_settings()
    # Beat keeps its schedule file there; the embedded broker and ledger live there too.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prepare_broker(settings)
    load_pipelines(settings)
    config = celery_config(settings)
    config["task_queues"] = [Queue(MAIN_QUEUE), Queue(RETRY_QUEUE)]
    return config


app = Celery("oncelery")
app.add_defaults(_configure)

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use and again after a fork."""
    global _runtime  # noqa: PLW0603 - one runtime per process, by design
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime.from_settings(get_settings())
    return _runtime


@worker_process_init.connect
def _fresh_runtime_in_child(**_: Any) -> None:
    # The parent may have opened connections before forking; the child must not reuse them
    # (DESIGN.md hazard 7). Dropping the reference is enough: `runtime()` builds a new one.
    global _runtime  # noqa: PLW0603
    _runtime = None


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    if _runtime is not None and _runtime.pid == os.getpid():
        _runtime.close()


def task_name(pipeline: str, step: str) -> str:
    """The Celery task name of a pipeline's step."""
    return f"oncelery.{pipeline}.{step}"


def client_app(settings: Settings) -> Celery:
    """A Celery app that only sends, configured from `settings` rather than the environment
    (for a process that talks to several brokers, such as the test suite)."""
    prepare_broker(settings)
    client = Celery("oncelery-client", set_as_current=False)
    client.config_from_object(celery_config(settings))
    return client


class CeleryDispatch:
    """Hands jobs on through Celery: next steps on the main queue, retries on their own.

    Args:
        task: the running task, for `retry_later` (None when only sending, e.g. enqueueing).
        sender: the app that publishes; the worker's own app by default.
    """

    def __init__(self, task: Task[Any, Any] | None = None, *, sender: Celery | None = None) -> None:
        self.task = task
        self.sender = sender or app

    def send(self, pipeline: str, step: str, job_id: str) -> None:
        """Publish a step of a job now."""
        self.sender.send_task(task_name(pipeline, step), args=[job_id], queue=MAIN_QUEUE)

    def retry_later(self, delay: float) -> NoReturn:
        """Publish the running task again on the retry queue after `delay` seconds."""
        assert self.task is not None
        raise self.task.retry(countdown=delay, queue=RETRY_QUEUE)


def _bind(pipeline: Pipeline[object]) -> None:
    for step in pipeline.steps:
        name = task_name(pipeline.name, step.name)

        def run(task: Task[Any, Any], job_id: str, *, _step: str = step.name) -> str:
            dispatch = CeleryDispatch(task)
            try:
                return str(run_step(runtime(), dispatch, pipeline, pipeline.step(_step), job_id))
            except DatabaseUnavailable as exc:
                # Acking now would drop the step; send it again and let the ledger sort it out.
                logger.warning("database unavailable: %s", exc.detail, extra={"action": "db_down"})
                dispatch.retry_later(_DATABASE_DOWN_DELAY)

        # max_retries=None: the ledger counts attempts and decides when to stop, not Celery.
        app.task(
            name=name, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
        )(run)


registry.on_add(_bind)
