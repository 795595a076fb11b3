"""The Celery and kombu glue: the app and its tasks, the consumer's batches, publishing, and
what the brokers hold."""

from __future__ import annotations

from jobs.worker import tasks
from jobs.worker.app import app, client_app, runtime
from jobs.worker.publishing import CeleryDispatch

__all__ = ["CeleryDispatch", "app", "client_app", "runtime", "tasks"]
