"""A call's message kept once the broker has it: when a decorated task is published (by the
user's code, or by Celery handing a canvas on to its next task), its call's job is created with
the message, so that a message the broker loses is re-sent by the calls' sweeper."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery import _state as celery_state
from celery.signals import after_task_publish

from jobs.tasks.calls import Call
from jobs.tasks.messages import decorated_task, hands_on, is_resend, published_message
from jobs.tasks.running import runtime

logger = logging.getLogger(__name__)


def is_bound(task: Task[Any, Any]) -> bool:
    """Whether the task's function takes the task itself first (`@app.task(bind=True)`)."""
    return not isinstance(inspect.getattr_static(type(task), "run", None), staticmethod)


def keep_call(
    name: str,
    body: Sequence[Any],
    headers: Mapping[str, Any],
    *,
    exchange: str | None,
    routing_key: str | None,
) -> str | None:
    """Create the job of the call a message of decorated task `name` carries, keeping the
    message; the job's id (None when `name` is not decorated here). A job already there (the
    same call sent before) keeps the message it has.

    Raises:
        TypeError, KeyError: the message's arguments do not fit the task (its run says so).
        ledger.LedgerError: the ledger could not be written.
    """
    found = decorated_task(name)
    if found is None:
        return None
    task, spec = found
    args, kwargs, _ = body
    # A bound task's function takes the task first: a stand-in, dropped from the arguments.
    positional = (task, *args) if is_bound(task) else tuple(args)
    call = Call.bind(name, spec, positional, kwargs, bound=is_bound(task))
    message = published_message(name, body, headers, exchange=exchange, routing_key=routing_key)
    parent = headers.get("parent_id")
    new_job = call.new_job(
        message, parent=parent if isinstance(parent, str) else None, hands_on=hands_on(message)
    )
    [(job_id, _)] = runtime().store.create_jobs([new_job], dispatched=True)
    return str(job_id)


# Kept after the publish, not before: a publish that raises (broker down, a message it
# refuses) tells the caller its call was not sent, and a call kept before it would be sent
# by the sweeper all the same. Keeping it first and confirming it afterwards would add a
# statement per call and recover nothing more: an unconfirmed call could never be sent (a
# failed publish and a death between publish and confirm look alike), and a confirm lost to
# a database blip would drop a call whose message is real. What is published but not kept
# (this process died in between, the ledger was down) is kept by its first run.
@after_task_publish.connect
def _on_publish(
    sender: str | None = None,
    body: Sequence[Any] | None = None,
    headers: Mapping[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    **_: Any,
) -> None:
    if sender is None or body is None or headers is None or is_resend():
        return
    current = celery_state.get_current_task()
    if current is not None and current.request.id == headers.get("id"):
        return  # Celery's retry of the call running here: its job exists
    if headers.get("eta") or headers.get("expires"):
        # A call for later, or not after a time: the sweeper cannot honour either, so its
        # job is made when it first runs (the broker holds it until then).
        return
    try:
        keep_call(sender, body, headers, exchange=exchange, routing_key=routing_key)
    except Exception as exc:  # noqa: BLE001 - the publish is done: its run creates the job
        logger.warning(
            "call of %s not kept after its publish: %s",
            sender,
            exc,
            extra={"action": "keep_failed", "task_id": headers.get("id")},
        )
