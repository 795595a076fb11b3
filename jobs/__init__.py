"""oncelery's public API: declare pipelines of steps, their delivery and retry policy, the
errors steps raise; `exactly_once` for the Celery tasks of any app; `jobs.app` is the Celery
app (`celery -A jobs worker` finds it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from jobs.errors import JobError, PermanentError, TransientError
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.retry import RetryPolicy

if TYPE_CHECKING:
    from celery import Celery

    from jobs.tasks import exactly_once, idempotency_key

__all__ = [
    "Delivery",
    "JobError",
    "PermanentError",
    "Pipeline",
    "RetryPolicy",
    "Step",
    "StepContext",
    "TransientError",
    "app",
    "exactly_once",
    "idempotency_key",
]


def __getattr__(name: str) -> Celery:
    # The Celery app is built on first use, so that declaring a pipeline (or importing the
    # Celery-free engine) does not import Celery; `exactly_once` imports Celery, not the app.
    if name == "app":
        from jobs.worker import app  # noqa: PLC0415

        return app
    if name in ("exactly_once", "idempotency_key"):
        from jobs import tasks  # noqa: PLC0415

        return cast("Celery", getattr(tasks, name))  # typed by the imports above
    raise AttributeError(f"module 'jobs' has no attribute {name!r}")
