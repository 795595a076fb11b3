"""The message kept with a call's job: what re-sends the call through its app — task, arguments,
task id and the canvas still to come — taken from a message being published, or from the
request of the task running it; and its re-send."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery import Celery, Task
from celery import _state as celery_state

from jobs.tasks.calls import SPEC_ATTRIBUTE, CallSpec
from ledger import JSON

_resending: ContextVar[bool] = ContextVar("oncelery_resending", default=False)


def as_json(value: object) -> JSON:
    """`value` as plain JSON (what is not JSON becomes its string)."""
    found: JSON = json.loads(json.dumps(value, default=str))
    return found


def decorated_task(name: str) -> tuple[Task[Any, Any], CallSpec] | None:
    """The task called `name` in an app of this process, with its `CallSpec`, if it is
    decorated with `exactly_once`."""
    # Celery's own list of the apps of this process (a publish does not say which sent it).
    for app in list(celery_state._get_active_apps()):  # type: ignore[attr-defined]
        task = app.tasks.get(name)
        spec = getattr(getattr(task, "run", None), SPEC_ATTRIBUTE, None)
        if task is not None and isinstance(spec, CallSpec):
            return task, spec
    return None


def hands_on(message: Mapping[str, JSON]) -> int:
    """How many calls of decorated tasks of the apps here a kept message's call hands on to
    at least: its chain's next link (a task, or each of a group's), its callbacks. Plain
    tasks and chords among them leave no call to count (a chord's body is its result
    backend's to send), so they add nothing."""
    return sum(_decorated_at_least(signature) for signature in _following(message))


def decorated_followers(message: Mapping[str, JSON]) -> int | None:
    """How many calls of decorated tasks a kept message's call hands on to (its chain's next
    link, a group's tasks each, its callbacks); None when it also hands on to something
    else (a plain task, a chord), whose publish leaves no trace to count."""
    total = 0
    for signature in _following(message):
        found = _decorated_count(signature)
        if found is None:
            return None
        total += found
    return total


def _following(message: Mapping[str, JSON]) -> list[JSON]:
    """The signatures a kept message's call hands on to once it succeeds."""
    options = message.get("options")
    if not isinstance(options, dict):
        return []
    chain, links = options.get("chain"), options.get("link")
    following = [chain[-1]] if isinstance(chain, list) and chain else []
    return following + (links if isinstance(links, list) else [])


def _decorated_at_least(signature: JSON) -> int:
    """The decorated calls `signature` publishes, among whatever else it publishes."""
    if not isinstance(signature, dict):
        return 0
    name, kwargs = signature.get("task"), signature.get("kwargs")
    if name == "celery.group" and isinstance(kwargs, dict):
        tasks = kwargs.get("tasks")
        return sum(_decorated_at_least(task) for task in tasks) if isinstance(tasks, list) else 0
    return 1 if isinstance(name, str) and decorated_task(name) is not None else 0


def _decorated_count(signature: JSON) -> int | None:
    """The decorated calls `signature` publishes (a group's, each); None when it publishes
    something else too."""
    if not isinstance(signature, dict):
        return None
    name, kwargs = signature.get("task"), signature.get("kwargs")
    if name == "celery.group" and isinstance(kwargs, dict):
        tasks = kwargs.get("tasks")
        counts = [_decorated_count(task) for task in tasks] if isinstance(tasks, list) else [None]
        return None if None in counts else sum(c for c in counts if c is not None)
    return 1 if isinstance(name, str) and decorated_task(name) is not None else None


def published_message(
    name: str,
    body: Sequence[Any],
    headers: Mapping[str, Any],
    *,
    exchange: str | None,
    routing_key: str | None,
) -> dict[str, JSON]:
    """The message a publish of task `name` carries (Celery's message protocol 2: the body is
    `(args, kwargs, embed)`), as the signature that sends it again."""
    args, kwargs, embed = body
    time_limit, soft_time_limit = headers.get("timelimit") or (None, None)
    options: dict[str, Any] = {
        "task_id": headers.get("id"),
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "group_id": headers.get("group"),
        "group_index": headers.get("group_index"),
        "shadow": headers.get("shadow"),
        "chord": embed.get("chord"),
        "chain": embed.get("chain"),
        "link": embed.get("callbacks"),
        "link_error": embed.get("errbacks"),
        "time_limit": time_limit,
        "soft_time_limit": soft_time_limit,
        **_destination(exchange, routing_key),
    }
    return _plain({"task": name, "args": list(args), "kwargs": dict(kwargs), "options": options})


def request_message(task: Task[Any, Any]) -> dict[str, JSON]:
    """The message of the call `task` is running, as the signature Celery's own retry would
    send (its task id, arguments, the canvas to come and the queue it came on)."""
    signature = task.signature_from_request()
    kept = _plain(dict(signature))
    options = kept.get("options")
    if isinstance(options, dict):
        # Delivery details of this copy, not of the call; and the call has started, so a
        # re-send must finish it, whatever its expiry said about starting.
        for name in ("redelivered", "retries", "countdown", "eta", "expires"):
            options.pop(name, None)
    return kept


def _destination(exchange: str | None, routing_key: str | None) -> dict[str, str]:
    # As `Task.signature_from_request`: a message to the default exchange names its queue.
    if not exchange and routing_key:
        return {"queue": routing_key}
    return {"exchange": exchange or "", "routing_key": routing_key or ""}


def _plain(value: Mapping[str, Any]) -> dict[str, JSON]:
    found = as_json(value)
    if not isinstance(found, dict):  # pragma: no cover - a mapping stays an object
        raise TypeError(f"not a message: {value!r}")
    return found


def resend(app: Celery, message: JSON) -> None:
    """Publish a kept message through `app` (its broker, its routes): the call with its task
    id and the canvas that follows it.

    Raises:
        TypeError: `message` is not a kept message.
    """
    if not isinstance(message, dict) or not isinstance(message.get("task"), str):
        raise TypeError(f"not a kept message: {message!r}")
    with resending():
        app.signature(message).apply_async()


@contextmanager
def resending() -> Iterator[None]:
    """While a kept message is sent again: its call's job exists, nothing to keep."""
    token = _resending.set(True)
    try:
        yield
    finally:
        _resending.reset(token)


def is_resend() -> bool:
    """Whether this publish sends a kept message again."""
    return _resending.get()
