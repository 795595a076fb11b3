"""Durable waits in a pipeline: `Sleep`, a step that waits a duration or until a time taken
from the job, and `WaitForSignal`, which waits for a signal up to a timeout; each a timer row
in the ledger (never a broker message or a worker's memory)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, TypeVar

from pydantic import TypeAdapter, ValidationError

from jobs.errors import PermanentError
from jobs.pipelines import Step, StepContext
from jobs.signals import InvalidSignal, SignalKey, check_name
from ledger import JSON, SignalWait

R = TypeVar("R")

#: Until a time: a function of the job's context and its earlier steps' results, or the
#: name of the field that holds an ISO 8601 time — a context field (`"remind_at"`), or a
#: step's result field (`"gather.remind_at"`).
Until = Callable[[Mapping[str, JSON], Mapping[str, JSON]], datetime] | str


def _never_run(ctx: StepContext[object]) -> JSON:
    # A wait step is never run by a worker: its timer (or signal) moves the job past it, and
    # a message for it arms or absorbs the wait (`jobs.engine.wait_messages`) before any
    # claim. Should one get here anyway, it fails for good rather than skip the wait.
    raise PermanentError(f"wait step {ctx.step!r} runs only when its wait ends")


def _timer_key(context: Mapping[str, JSON]) -> str:
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()
    return digest[:32]


@dataclass(frozen=True, kw_only=True)
class Wait(Step[R]):
    """A step that waits, never run by a worker: when the job reaches it, its timer is set in
    the transaction that records the step before (`Sleep`, `WaitForSignal`). Neither the
    first step, nor right after a map step, nor right after another wait."""

    run: Callable[[StepContext[R]], JSON] = field(default=_never_run, repr=False)  # type: ignore[assignment]
    key: str | Callable[[Mapping[str, JSON]], str] = field(default=_timer_key, repr=False)
    sleeps: ClassVar[bool] = True
    #: What starts its own key in the job's plan (`key_for`).
    _kind: ClassVar[str] = "wait"

    def key_for(self, context: Mapping[str, JSON]) -> str:
        """A key of its own per step and context: never claimed on the way (the timer is
        the wait's identity), but a stray message's claim (see `_never_run`) must not land
        on a key every wait shares."""
        return f"{self._kind}:{self.name}:{_timer_key(context)}"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limits:
            raise ValueError(f"wait step {self.name!r}: a wait takes no limits")

    def due(self, context: Mapping[str, JSON], results: Mapping[str, JSON]) -> datetime | timedelta:
        """When the job's timer is due: a time, or a delay from the moment the job reaches
        the step, which the ledger adds to the database's clock in the transaction that
        moves it there (no worker's clock, no time spent before the commit).

        Raises:
            ValueError: the job does not say when (a field or function that gives no time).
        """
        raise NotImplementedError

    def signal_wait(
        self,
        context: Mapping[str, JSON],  # noqa: ARG002 - a wait for a signal's
        then: str | None,  # noqa: ARG002 - a wait for a signal's
    ) -> SignalWait | None:
        """What a job reaching the step waits for besides its timer, if anything (`then`: the
        step after this one).

        Raises:
            ValueError: it cannot be told from the job's context.
        """
        return None


@dataclass(frozen=True, kw_only=True)
class Sleep(Wait[R]):
    """A step that waits: `Sleep("cool_off", seconds=600)`, or `until=` a time from the job.

    When the job reaches it, its timer is set in the transaction that records the step
    before (no broker message, nothing in a worker's memory); the timer loop fires it once
    when due, moving the job on to the next step (or finishing it). The step's result is the
    wait's `due_at`, `fired_at` and `late_ms`. Neither the first step, nor right after a map
    step, nor right after another wait.

    Args:
        seconds: how long to wait from the moment the job reaches the step.
        until: when to wake: a function `(context, results) -> datetime` (timezone-aware),
            or the name of a field holding an ISO 8601 time with its offset (`"remind_at"` in
            the context, `"gather.remind_at"` in step gather's result). A time already past
            fires at once.
    """

    seconds: float | None = None
    until: Until | None = None
    _kind: ClassVar[str] = "sleep"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.seconds is None) == (self.until is None):
            raise ValueError(f"sleep step {self.name!r}: give seconds or until, not both")
        if self.seconds is not None and not (0 <= self.seconds < math.inf):
            raise ValueError(
                f"sleep step {self.name!r}: seconds must be 0 or more, got {self.seconds!r}"
            )
        if isinstance(self.until, str) and not self.until:
            raise ValueError(f"sleep step {self.name!r}: until names no field")

    def due(self, context: Mapping[str, JSON], results: Mapping[str, JSON]) -> datetime | timedelta:
        """When the job's timer is due: a time, or (`seconds`) a delay (see `Wait.due`).

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


#: A wait's timeout: seconds, or a function of the job's context and its earlier steps'
#: results giving seconds or a timezone-aware time.
Timeout = float | Callable[[Mapping[str, JSON], Mapping[str, JSON]], float | datetime]


@dataclass(frozen=True, kw_only=True)
class WaitForSignal(Wait[R]):
    """A step that waits for a signal, up to a timeout:
    `WaitForSignal("wait_shipped", signal="shipped", key="{order_id}", timeout=3 * 86_400)`.

    When the job reaches it (in the transaction that records the step before), a signal of
    that name and key already kept (sent before anyone waited) is taken at once and the job
    moves on; else its timer is set for the timeout. Whichever then comes first wins by one
    compare-and-set on the wait's timer: a signal (`jobs.signal`, `oncelery signal`, `POST
    /signals/{name}`) moves the job on in its own transaction, or the timer loop does when
    the timeout is due; the loser changes nothing (a signal that came too late is kept for
    the next wait of its name and key). The step's result says which won and when: `{"by":
    "signal" | "timeout", "signal_id", "data", "at", "due_at", …}`; the next step reads it
    and chooses what to do, under its own one key.

    Args:
        signal: the signal's name (letters, digits and `_.:-`).
        key: which signal of that name is this job's: a template over the job's context
            (`"{order_id}"`) or a function of it (not an idempotency key: a wait claims none).
            One signal ends one wait: with several jobs waiting for the same key, the oldest
            wait takes it.
        timeout: seconds from the moment the job reaches the step, or a function `(context,
            results)` giving seconds or a timezone-aware time (read when the job reaches it;
            a time already past fires at once).
    """

    key: str | Callable[[Mapping[str, JSON]], str]
    signal: str
    timeout: Timeout
    _kind: ClassVar[str] = "signal"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_name(self.signal)
        except InvalidSignal as exc:
            raise ValueError(f"wait step {self.name!r}: signal {exc.problem}") from None
        if not callable(self.timeout) and not (0 <= self.timeout < math.inf):
            raise ValueError(
                f"wait step {self.name!r}: timeout must be 0 or more seconds, got {self.timeout!r}"
            )

    def due(self, context: Mapping[str, JSON], results: Mapping[str, JSON]) -> datetime | timedelta:
        """When the wait times out (see `Wait.due`).

        Raises:
            ValueError: the timeout function gave no number of seconds (0 or more) and no
                timezone-aware time.
        """
        found = self.timeout(context, results) if callable(self.timeout) else self.timeout
        if isinstance(found, datetime):
            if found.utcoffset() is None:
                raise ValueError(f"wait step {self.name!r}: timeout {found!r} has no UTC offset")
            return found.astimezone(UTC)
        if isinstance(found, bool) or not isinstance(found, int | float):
            raise ValueError(f"wait step {self.name!r}: timeout gave {found!r}, not seconds")
        if not (0 <= found < math.inf):
            raise ValueError(f"wait step {self.name!r}: timeout gave {found!r} seconds")
        return timedelta(seconds=found)

    def signal_wait(self, context: Mapping[str, JSON], then: str | None) -> SignalWait:
        """The signal name and key a job waits for here (its key from the job's context).

        Raises:
            ValueError: the key template names a field the context lacks, or the key is no
                valid signal key (empty, over 300 characters).
        """
        try:
            key = Step.key_for(self, context)
        except KeyError as exc:
            raise ValueError(f"wait step {self.name!r}: {exc.args[0]}") from None
        try:
            _SIGNAL_KEY.validate_python(key, strict=True)
        except ValidationError:
            raise ValueError(
                f"wait step {self.name!r}: signal key {key[:50]!r} is not 1 to 300 characters"
            ) from None
        return SignalWait(signal=self.signal, key=key, then=then)


_SIGNAL_KEY: TypeAdapter[str] = TypeAdapter(SignalKey)


def is_wait(step: Step[object] | None) -> bool:
    """Whether a step is a wait (`Sleep`, `WaitForSignal`)."""
    return isinstance(step, Wait)
