"""oncelery's public API: declare pipelines of steps (map, sleep and signal-wait steps too),
their delivery, retry policy and limits, the errors steps raise; start jobs (`enqueue`), wait
for them (`wait`), signal the jobs that wait (`signal`); `exactly_once` for the Celery tasks of
any app; `jobs.app` is the Celery app (`celery -A jobs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.errors import InvalidEvent, JobError, PermanentError, TransientError, UnknownPipeline
from jobs.limits import ConcurrencyLimit, RateLimit
from jobs.maps import Expand, ItemContext, MapPolicy, MapStep
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.retry import RetryPolicy
from jobs.signals import InvalidSignal
from jobs.waits import Sleep, WaitForSignal
from ledger import EventConflict, SignalConflict, SignalOutcome

if TYPE_CHECKING:
    from celery import Celery

    from jobs.client import enqueue, signal, wait
    from jobs.tasks import exactly_once, idempotency_key

    app: Celery

__all__ = [
    "ConcurrencyLimit",
    "Delivery",
    "EventConflict",
    "Expand",
    "InvalidEvent",
    "InvalidSignal",
    "ItemContext",
    "JobError",
    "MapPolicy",
    "MapStep",
    "PermanentError",
    "Pipeline",
    "RateLimit",
    "RetryPolicy",
    "SignalConflict",
    "SignalOutcome",
    "Sleep",
    "Step",
    "StepContext",
    "TransientError",
    "UnknownPipeline",
    "WaitForSignal",
    "app",
    "enqueue",
    "exactly_once",
    "idempotency_key",
    "signal",
    "wait",
]


def __getattr__(name: str) -> object:
    # Looked up on first use, so that declaring a pipeline (or importing the Celery-free
    # engine) imports neither Celery nor the client's modules; `exactly_once` imports Celery,
    # not the app.
    if name == "app":
        from jobs.worker import app  # noqa: PLC0415

        return app
    if name in ("enqueue", "signal", "wait"):
        from jobs import client  # noqa: PLC0415

        return getattr(client, name)
    if name in ("exactly_once", "idempotency_key"):
        from jobs import tasks  # noqa: PLC0415

        return getattr(tasks, name)
    raise AttributeError(f"module 'jobs' has no attribute {name!r}")
