"""`exactly_once`: the decorator that puts a Celery task of any app under the step protocol —
placed under `@app.task`, it claims the call's key before the body runs and answers a repeat
with the recorded result."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from celery import Task
from celery._state import get_current_task

from jobs.pipelines import Delivery
from jobs.retry import RetryPolicy
from jobs.tasks.calls import SPEC_ATTRIBUTE, Call, CallSpec
from jobs.tasks.running import run_call

P = ParamSpec("P")
R = TypeVar("R")


def exactly_once(
    *,
    key: str,
    delivery: Delivery = Delivery.EXACTLY_ONCE,
    retry: RetryPolicy | None = None,
    effect: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run a Celery task's body once per key: place it under `@app.task`.

    Before the body runs, the call claims `key` templated from its arguments (by name, as
    bound to the function); the arguments' fingerprint goes with it. The body's return value
    (JSON) is recorded, and any later delivery or re-send of the call returns it without
    running the body. Inside the body, `idempotency_key()` is the key to pass on.

    Args:
        key: the key template over the task's argument names (`"charge:{order_id}"`; items
            and attributes too: `"charge:{order[id]}"`). Derive it from the business
            identity: the same key with other arguments is an error, not a repeat.
        delivery: `Delivery.EXACTLY_ONCE` (the provider honours the key: a repeat after a
            crash is safe) or `Delivery.AT_MOST_ONCE` (it does not: a worker lost between
            acting and recording leaves the call `unknown`, dead-lettered for a person).
        retry: the retry policy of failed attempts (the settings' by default, overridden by
            `ONCELERY_STEP_POLICIES["task:<task name>.call"]`).
        effect: the kind of effect the body applies (`"charge"`), as for a pipeline step.

    Raises:
        ValueError: at decoration, a template field that names no argument of the function.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        spec = CallSpec.of(function, key, delivery, retry, effect)

        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            # The task being run (pushed by Celery's tracer, or by `Task.__call__`): needed
            # even when the task is not bound, for its name, request and retry.
            task = get_current_task()
            if not isinstance(task, Task):
                raise TypeError(f"{function.__qualname__}: exactly_once goes under @app.task")
            bound = bool(args) and isinstance(args[0], Task)
            this = Call.bind(task.name, spec, args, kwargs, bound=bound)
            result: R = run_call(task, spec, this, lambda: function(*args, **kwargs))  # type: ignore[assignment]
            return result

        setattr(call, SPEC_ATTRIBUTE, spec)
        return call

    return decorate
