"""Durable waits in a pipeline: `Sleep`, a step that waits a duration or until a time taken
from the job, as a timer row in the ledger (never a broker message or a worker's memory)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, TypeVar

from jobs.errors import PermanentError
from jobs.pipelines import Step, StepContext
from ledger import JSON

R = TypeVar("R")

#: Until a time: a function of the job's context and its earlier steps' results, or the
#: name of the field that holds an ISO 8601 time — a context field (`"remind_at"`), or a
#: step's result field (`"gather.remind_at"`).
Until = Callable[[Mapping[str, JSON], Mapping[str, JSON]], datetime] | str


def _never_run(ctx: StepContext[object]) -> JSON:
    # A sleep step is never run by a worker: its timer moves the job past it. A message for
    # it (a replay of its dead letter, say) fails for good rather than skip the wait.
    raise PermanentError(f"sleep step {ctx.step!r} runs only when its timer fires")


def _timer_key(context: Mapping[str, JSON]) -> str:
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()
    return digest[:32]


@dataclass(frozen=True, kw_only=True)
class Sleep(Step[R]):
    """A step that waits: `Sleep("cool_off", seconds=600)`, or `until=` a time from the job.

    When the job reaches it, its timer is set in the transaction that records the step
    before (no broker message, nothing in a worker's memory); the timer loop fires it once
    when due, moving the job on to the next step (or finishing it). The step's result is the
    wait's `due_at`, `fired_at` and `late_ms`. Neither the first step, nor right after a map
    step, nor right after another sleep.

    Args:
        seconds: how long to wait from the moment the job reaches the step.
        until: when to wake: a function `(context, results) -> datetime` (timezone-aware),
            or the name of a field holding an ISO 8601 time with its offset (`"remind_at"` in
            the context, `"gather.remind_at"` in step gather's result). A time already past
            fires at once.
    """

    run: Callable[[StepContext[R]], JSON] = field(default=_never_run, repr=False)  # type: ignore[assignment]
    key: str | Callable[[Mapping[str, JSON]], str] = field(default=_timer_key, repr=False)
    seconds: float | None = None
    until: Until | None = None
    sleeps: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limits:
            raise ValueError(f"sleep step {self.name!r}: a sleep takes no limits")
        if (self.seconds is None) == (self.until is None):
            raise ValueError(f"sleep step {self.name!r}: give seconds or until, not both")
        if self.seconds is not None and not (0 <= self.seconds < math.inf):
            raise ValueError(
                f"sleep step {self.name!r}: seconds must be 0 or more, got {self.seconds!r}"
            )
        if isinstance(self.until, str) and not self.until:
            raise ValueError(f"sleep step {self.name!r}: until names no field")

    def key_for(self, context: Mapping[str, JSON]) -> str:
        """A key of its own per step and context: never claimed on the way (the timer is
        the wait's identity), but a stray message's claim (see `_never_run`) must not land
        on a key every sleep shares."""
        return f"sleep:{self.name}:{_timer_key(context)}"

    def due(self, context: Mapping[str, JSON], results: Mapping[str, JSON]) -> datetime | timedelta:
        """When the job's timer is due: a time, or (`seconds`) a delay from the moment the
        job reaches the step, which the ledger adds to the database's clock in the
        transaction that moves it there (no worker's clock, no time spent before the commit).

        Raises:
            ValueError: `until` names a field that is missing or holds no time with an
                offset, or its function returned no timezone-aware time.
        """
        if self.seconds is not None:
            return timedelta(seconds=self.seconds)
        if callable(self.until):
            found = self.until(context, results)
            if not isinstance(found, datetime) or found.utcoffset() is None:
                raise ValueError(
                    f"sleep step {self.name!r}: until returned {found!r}, not an aware datetime"
                )
            return found.astimezone(UTC)
        return _time_in(self.name, str(self.until), context, results)


def _time_in(
    step: str, path: str, context: Mapping[str, JSON], results: Mapping[str, JSON]
) -> datetime:
    """The time in field `path` (`field`, or `step.field` of a result)."""
    head, _, rest = path.partition(".")
    value: JSON = context.get(head) if not rest else results.get(head)
    if rest:
        value = value.get(rest) if isinstance(value, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"sleep step {step!r}: until field {path!r} holds no time: {value!r}")
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"sleep step {step!r}: until field {path!r} is not an ISO 8601 time: {value!r}"
        ) from None
    if found.utcoffset() is None:
        raise ValueError(f"sleep step {step!r}: until field {path!r} has no UTC offset: {value!r}")
    return found.astimezone(UTC)


def is_sleep(step: Step[object] | None) -> bool:
    """Whether a step is a `Sleep`."""
    return isinstance(step, Sleep)
