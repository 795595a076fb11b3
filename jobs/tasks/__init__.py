"""Exactly once for the Celery tasks people already have: `exactly_once` under `@app.task` of
any Celery app, `idempotency_key()` inside its body; each call is a job of the ledger."""

from __future__ import annotations

from jobs.tasks.calls import PIPELINE_PREFIX, STEP, is_task_pipeline
from jobs.tasks.decorator import exactly_once
from jobs.tasks.running import idempotency_key
from jobs.tasks.worker import check_settings

# `jobs.tasks.worker` connects the worker signals that check settings and sweep the calls.

__all__ = [
    "PIPELINE_PREFIX",
    "STEP",
    "check_settings",
    "exactly_once",
    "idempotency_key",
    "is_task_pipeline",
]
