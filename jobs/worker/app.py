"""The Celery app, configured from the settings when Celery first reads its configuration, and
each process's runtime (rebuilt after every fork)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

import jobs.worker.embedded_broker  # noqa: F401 - registers the embedded transport's name
from config import Settings, celery_config, get_settings, prepare_broker
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.worker.queues import declare_dead_letter_queue
from jobs.worker.redis_broker import LendRedisClient


def _configure() -> dict[str, object]:
    # Called by Celery when its configuration is first read: settings errors surface then,
    # not at import, so `oncelery` can report them as one line.
    settings = get_settings()
    # Beat keeps its schedule file there; the embedded broker and ledger live there too.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prepare_broker(settings)
    load_pipelines(settings)
    return celery_config(settings)


app = Celery("oncelery")
app.add_defaults(_configure)
app.steps["consumer"].add(LendRedisClient)

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


@worker_ready.connect
def _declare_dead_letter_queue(**_: Any) -> None:
    # RabbitMQ drops a rejected message whose dead-letter exchange does not exist; the queue
    # is bounded, and one declared unbounded by an older version is replaced.
    if get_settings().broker_kind == "amqp":
        declare_dead_letter_queue(app)


def client_app(settings: Settings) -> Celery:
    """A Celery app that only sends, configured from `settings` rather than the environment
    (for a process that talks to several brokers, such as the test suite)."""
    prepare_broker(settings)
    client = Celery("oncelery-client", set_as_current=False)
    client.config_from_object(celery_config(settings))
    return client
