"""Exactly once for the Celery tasks people already have: `exactly_once` under `@app.task` of
any Celery app, `idempotency_key()` inside its body; each call is a job of the ledger."""

from __future__ import annotations

from jobs.tasks.calls import PIPELINE_PREFIX, STEP, is_task_pipeline
from jobs.tasks.decorator import exactly_once
from jobs.tasks.messages import resend
from jobs.tasks.publishing import keep_call
from jobs.tasks.revoked import cancel_revoked
from jobs.tasks.running import idempotency_key
from jobs.tasks.time_limits import dead_letter_timed_out
from jobs.tasks.worker import check_settings

# `jobs.tasks.publishing` connects the signal that keeps a call's message once it is published;
# `jobs.tasks.revoked` the one that cancels a revoked call; `jobs.tasks.time_limits` the one
# that dead-letters a call its hard time limit killed; `jobs.tasks.worker` those that check a
# worker's settings and sweep the calls.

__all__ = [
    "PIPELINE_PREFIX",
    "STEP",
    "cancel_revoked",
    "check_settings",
    "dead_letter_timed_out",
    "exactly_once",
    "idempotency_key",
    "is_task_pipeline",
    "keep_call",
    "resend",
]
