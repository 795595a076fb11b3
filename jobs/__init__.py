"""oncelery's Celery side: the app, the public API to declare pipelines, retries and errors.

`celery -A jobs worker` finds `jobs.app`, the Celery application.
"""

from __future__ import annotations

from jobs.app import app
from jobs.errors import JobError, PermanentError, TransientError
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.retry import RetryPolicy

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
]
