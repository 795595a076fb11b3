"""A call of a decorated Celery task as the ledger sees it: a job of a one-step pipeline
(`task:<task name>`) whose step `call` claims the key templated from the task's arguments."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from config import Settings
from jobs.pipelines import Delivery, Pipeline, Step, StepContext, fingerprint
from jobs.retry import RetryPolicy
from ledger import JSON, NewJob

#: A decorated task's pipeline is named after the task, behind this prefix.
PIPELINE_PREFIX: Final = "task:"
#: The one step of a decorated task's pipeline.
STEP: Final = "call"
#: Event ids are at most this long (`jobs.event_id`).
_EVENT_ID_LIMIT: Final = 200
#: The attribute a decorated function carries its `CallSpec` in (the publish hook, the
#: sweeper and the settings check find decorated tasks by it).
SPEC_ATTRIBUTE: Final = "__oncelery_call__"


class TaskPipeline(Pipeline[object]):
    """The pipeline of a decorated task: not in the registry, since `jobs.app` binds no task
    to it (the user's own Celery app runs it)."""

    registered = False


def is_task_pipeline(name: str) -> bool:
    """Whether a pipeline name is a decorated task's."""
    return name.startswith(PIPELINE_PREFIX)


def task_pipeline(
    task: str,
    act: Callable[[StepContext[object]], JSON],
    *,
    delivery: Delivery = Delivery.EXACTLY_ONCE,
    retry: RetryPolicy | None = None,
    effect: str | None = None,
) -> TaskPipeline:
    """The pipeline of decorated task `task`: its step `call` runs `act`."""
    step: Step[object] = Step(
        STEP,
        act,
        key=lambda context: str(context["key"]),
        delivery=delivery,
        effect=effect,
        retry=retry,
    )
    return TaskPipeline(name=PIPELINE_PREFIX + task, steps=[step], resources=_no_resources)


def _no_resources(_: Settings) -> object:
    return None


@dataclass(frozen=True)
class CallSpec:
    """What `exactly_once` learnt of a task function when it decorated it.

    Args:
        template: the key template, over the function's argument names
            (`"charge:{order_id}"`, `"charge:{order[id]}"`).
        signature: the function's signature (its first parameter is the task itself when the
            task is bound).
        delivery: the call's promise, as for a pipeline step.
    """

    template: str
    signature: inspect.Signature
    delivery: Delivery
    retry: RetryPolicy | None
    effect: str | None

    @classmethod
    def of(
        cls,
        function: Callable[..., Any],
        template: str,
        delivery: Delivery,
        retry: RetryPolicy | None = None,
        effect: str | None = None,
    ) -> CallSpec:
        """Check the template against the function's arguments.

        Raises:
            ValueError: a field names no argument, or is positional (`{}`, `{0}`); the
                delivery is read-only (a task worth a key has an effect).
        """
        if delivery is Delivery.READ_ONLY:
            raise ValueError("exactly_once: a read-only task needs no key; drop the decorator")
        signature = inspect.signature(function)
        names = set(signature.parameters)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for field in template_fields(template):
            if not field or field.isdigit():
                raise ValueError(
                    f"exactly_once key {template!r}: name the argument in each field, "
                    f"as in {{order_id}}"
                )
            if field not in names and not takes_any:
                raise ValueError(
                    f"exactly_once key {template!r}: {function.__qualname__} has no argument "
                    f"{field!r} (it takes {', '.join(signature.parameters) or 'none'})"
                )
        return cls(template, signature, delivery, retry, effect)


def template_fields(template: str) -> list[str]:
    """The argument each field of a key template starts from (`order` for `{order[id]}`)."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for name in fields]


@dataclass(frozen=True)
class Call:
    """One call of a decorated task: its arguments by name, its key and its fingerprint; its
    delivery and the kind of effect it applies (for dead letters and the audit)."""

    task: str
    arguments: dict[str, JSON]
    key: str
    fingerprint: str
    delivery: Delivery = Delivery.EXACTLY_ONCE
    effect: str | None = None

    @classmethod
    def bind(
        cls, task: str, spec: CallSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any], *,
        bound: bool,
    ) -> Call:  # fmt: skip
        """The call of `task` with these arguments (`bound`: the first is the task itself).

        Raises:
            TypeError: the arguments do not fit the function, or are not JSON.
            KeyError: the key template needs an argument the call did not get.
        """
        found = spec.signature.bind(*args, **kwargs)
        found.apply_defaults()
        named = dict(found.arguments)
        if bound:
            named.pop(next(iter(spec.signature.parameters)))
        try:
            arguments: dict[str, JSON] = json.loads(json.dumps(named))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{task}: exactly_once needs JSON arguments ({exc})") from None
        flat = dict(arguments)
        for parameter in spec.signature.parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD and parameter.name in flat:
                extra = flat.pop(parameter.name)
                flat.update(extra if isinstance(extra, dict) else {})
        try:
            key = spec.template.format_map(flat)
        except (KeyError, IndexError, AttributeError) as exc:
            raise KeyError(
                f"{task}: key template {spec.template!r} needs {exc} in {sorted(flat)}"
            ) from None
        pipeline = PIPELINE_PREFIX + task
        digest = fingerprint(pipeline, {"arguments": arguments})
        return cls(task, arguments, key, digest, spec.delivery, spec.effect)

    @property
    def pipeline(self) -> str:
        return PIPELINE_PREFIX + self.task

    @property
    def event_id(self) -> str:
        """The call's identity among the task's jobs: its key and its arguments' fingerprint,
        so a call with other arguments under a used key is a job of its own, whose claim
        the ledger refuses (`FingerprintMismatch`), instead of a conflict nobody sees."""
        suffix = "#" + self.fingerprint[:16]
        key = self.key
        if len(key) + len(suffix) > _EVENT_ID_LIMIT:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return key + suffix

    def new_job(
        self, message: Mapping[str, JSON], *, parent: str | None = None, hands_on: int = 0
    ) -> NewJob:
        """The call's job, keeping `message` (what re-sends the call) in its context.

        Args:
            message: the kept message.
            parent: the task id of the call that handed on to this one (a chain's previous
                call, a callback's caller), if any.
            hands_on: how many calls of decorated tasks the call hands on to (its chain's
                next link, a group's tasks each, its callbacks): the sweeper re-sends it,
                recorded, until as many calls name it as their parent.
        """
        options = message.get("options")
        task_id = options.get("task_id") if isinstance(options, dict) else None
        context: dict[str, JSON] = {
            "task": self.task,
            "key": self.key,
            "arguments": self.arguments,
            "delivery": str(self.delivery),
            "effect": self.effect,
            "message": dict(message),
            "task_id": task_id if isinstance(task_id, str) else None,
            "parent": parent,
        }
        if hands_on:
            context["hands_on"] = hands_on
        return NewJob(
            pipeline=self.pipeline,
            event_id=self.event_id,
            context=context,
            fingerprint=self.fingerprint,
            step_keys={STEP: self.key},
            first_step=STEP,
        )
