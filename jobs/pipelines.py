"""The public API to declare a pipeline: an ordered list of named steps, each a plain function
that only acts (the engine claims, records, retries and chains)."""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_json

from config import Settings
from jobs.errors import InvalidEvent, UnknownPipeline
from jobs.limits import Limit, check_limits, missing_fields
from jobs.retry import RetryPolicy
from ledger import JSON, ItemResult, NewJob

R = TypeVar("R")

#: The longest time limit a step may have, in seconds (as `ONCELERY_STEP_TIME_LIMIT`).
MAX_TIME_LIMIT = 3_600.0


class Delivery(enum.StrEnum):
    """What a step promises about its effect on the outside world."""

    #: The provider honours idempotency keys: a repeat after a crash is deduplicated there.
    EXACTLY_ONCE = "exactly_once"
    #: The provider ignores keys: a crash between acting and recording leaves the step
    #: `unknown` and the job dead-lettered for a person, never silently resent.
    AT_MOST_ONCE = "at_most_once"
    #: The step changes nothing outside (it reads), so running it twice is harmless: on
    #: Postgres a run does it without claiming its key first, and records its result
    #: fenced by the job's current step (a run that may repeat one whose worker died
    #: still claims, so that attempts are counted).
    READ_ONLY = "read_only"


def _no_items(step: str) -> Iterator[ItemResult]:
    raise LookupError(f"no map step {step!r} can be read here")


@dataclass(frozen=True)
class StepContext(Generic[R]):
    """What a step function receives."""

    job_id: str
    pipeline: str
    step: str
    #: The idempotency key: pass it to the provider (e.g. as `Idempotency-Key`).
    key: str
    #: This attempt's number, from 1.
    attempt: int
    #: The job's input, as enqueued.
    context: Mapping[str, JSON]
    #: The recorded results of the steps before this one, by step name.
    results: Mapping[str, JSON]
    #: The pipeline's per-process resources (an HTTP client, say).
    resources: R
    #: A map step's items with their results, in item order, read page by page from the
    #: ledger (`ctx.items("search")`): how the step after a map (its join) reads it.
    items: Callable[[str], Iterator[ItemResult]] = field(
        default=_no_items, repr=False, compare=False
    )


@dataclass(frozen=True)
class Step(Generic[R]):
    """One named step of a pipeline.

    Args:
        name: unique within the pipeline; part of the Celery task name.
        run: the function that acts: it receives a `StepContext` (the job's context, the
            earlier steps' recorded results, its idempotency key) and returns a JSON-able
            result.
        key: the idempotency key, a template over the job's context (`"order:{order_id}:charge"`)
            or a function of it; derive it from the business identity, not from the job id, so
            the same request arriving as two events is still done once.
        delivery: exactly-once (the provider honours keys), at-most-once, or read-only.
        effect: the kind of outside effect this step applies (`"charge"`), for the audit.
        retry: this step's retry policy; the settings' policy when None.
        time_limit: seconds one attempt may take before it is interrupted (soft limit; the
            hard limit follows 5 s later); the settings' `ONCELERY_STEP_TIME_LIMIT` when None.
        unapplied_statuses: for an at-most-once step, provider statuses that are known to
            mean nothing was applied (a provider that refuses with 429 before doing anything,
            say): such an answer is retried. Any other failure after a request went out may
            have acted, and leaves the step `unknown` for a person.
        limits: a `RateLimit` and a `ConcurrencyLimit` at most, obeyed by every worker (a
            map step's are its items'); `ONCELERY_LIMITS` replaces them by kind.
    """

    name: str
    run: Callable[[StepContext[R]], JSON]
    key: str | Callable[[Mapping[str, JSON]], str]
    delivery: Delivery = Delivery.EXACTLY_ONCE
    effect: str | None = None
    retry: RetryPolicy | None = None
    time_limit: float | None = None
    unapplied_statuses: frozenset[int] = frozenset()
    limits: Sequence[Limit] = ()
    #: Whether the step is a wait its timer ends (`jobs.waits.Sleep`), never run by a worker.
    sleeps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Written as "not (… < …)" so that NaN, which compares false with everything, is
        # refused with the rest: a pipeline whose limit cannot bound a step never loads.
        if self.time_limit is not None and not (0 < self.time_limit <= MAX_TIME_LIMIT):
            raise ValueError(
                f"step {self.name!r}: time_limit must be above 0 and at most "
                f"{MAX_TIME_LIMIT:g} s, got {self.time_limit!r}"
            )
        # `each` marks a map step (`jobs.maps`, which builds on this module): its limits
        # are its items', whose keys may name their fields.
        check_limits(self.name, self.limits, items=hasattr(self, "each"))
        object.__setattr__(self, "limits", tuple(self.limits))

    def key_for(self, context: Mapping[str, JSON]) -> str:
        """This step's idempotency key for a job context."""
        if callable(self.key):
            return self.key(context)
        missing = sorted(self.key_fields() - set(context))
        if missing:
            raise KeyError(f"key template {self.key!r} needs context fields {missing}")
        return self.key.format_map(context)

    def key_fields(self) -> set[str]:
        """The context fields a key template names (none for a key function)."""
        if callable(self.key):
            return set()
        return {name for _, name, _, _ in string.Formatter().parse(self.key) if name}


@dataclass(frozen=True)
class Pipeline(Generic[R]):
    """An ordered list of named steps, and the per-process resources they share.

    Args:
        name: unique; part of the Celery task names (`oncelery.<name>.<step>`).
        steps: run in order; each sees the results of those before it.
        resources: builds what the steps share from the settings, once per worker process
            (after the fork, so sockets are never shared between processes).
        input: the pydantic model of a job's payload (its context): validated strictly
            (nothing coerced) from JSON, and it must reject unknown fields
            (`model_config = ConfigDict(extra="forbid")`). `event_id` is not part of it: it
            comes beside the payload. None: any JSON object is accepted as it is.
    """

    name: str
    steps: Sequence[Step[R]]
    resources: Callable[[Settings], R]
    input: type[BaseModel] | None = None
    _by_name: dict[str, Step[R]] = field(init=False, repr=False, compare=False)
    #: Whether declaring one adds it to `registry` (whose tasks `jobs.app` binds); the
    #: pipeline of a decorated Celery task (`jobs.tasks`) runs in its own app instead.
    registered: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"pipeline {self.name!r} has no steps")
        by_name = {step.name: step for step in self.steps}
        if len(by_name) != len(self.steps):
            raise ValueError(f"pipeline {self.name!r} has two steps with the same name")
        if self.input is not None:
            _check_input(self)
        _check_sleeps(self)
        object.__setattr__(self, "_by_name", by_name)
        if self.registered:
            registry.add(self)

    def validate_input(self, payload: object) -> dict[str, JSON]:
        """The job context of a payload (a mapping, or an instance of the input model): turned
        into JSON values, validated by the input model in strict mode (a field whose JSON is
        text, a date say, declares `Field(strict=False)`), dumped back as JSON. An integral
        number written `2.0` is taken for an int field (`json_number`).

        Raises:
            pydantic.ValidationError: the payload does not fit the input model.
            InvalidEvent: it cannot be JSON, or (without a model) is not a JSON object.
        """
        try:
            text = to_json(payload)
        except PydanticSerializationError as exc:
            raise InvalidEvent(f"payload: cannot be sent as JSON ({exc})") from None
        value = json.loads(text)
        if self.input is not None:
            try:
                valid = self.input.model_validate(value, strict=True)
            except ValidationError:
                # Again with integral numbers as ints (`2.0` for an int field): only input
                # refused so far reads differently, so no context accepted before changes.
                whole = json.loads(text, parse_float=json_number)
                valid = self.input.model_validate(whole, strict=True)
            return valid.model_dump(mode="json")
        if not isinstance(value, dict):
            raise InvalidEvent(f"payload: expected a JSON object, got {type(payload).__name__}")
        return value

    def step(self, name: str) -> Step[R]:
        """The step called `name`."""
        return self._by_name[name]

    def next_step(self, name: str) -> Step[R] | None:
        """The step after `name`, or None after the last one."""
        names = [step.name for step in self.steps]
        index = names.index(name) + 1
        return self.steps[index] if index < len(self.steps) else None

    def new_job(self, event_id: str, context: Mapping[str, JSON]) -> NewJob:
        """The job to create for one event: every step's key, and the context's fingerprint."""
        return NewJob(
            pipeline=self.name,
            event_id=event_id,
            context=context,
            fingerprint=fingerprint(self.name, context),
            step_keys={step.name: step.key_for(context) for step in self.steps},
            first_step=self.steps[0].name,
        )


def _check_sleeps(pipeline: Pipeline[R]) -> None:
    """Refuse a sleep step where nothing would set its timer: first (no step records into
    it), after a map step (its join moves the job on without one), after another sleep."""
    name, steps = pipeline.name, pipeline.steps
    if steps[0].sleeps:
        raise ValueError(f"pipeline {name!r}: a sleep step cannot be the first step")
    for before, step in itertools.pairwise(steps):
        if not step.sleeps:
            continue
        if before.sleeps:
            raise ValueError(
                f"pipeline {name!r}: sleep step {step.name!r} follows another sleep; make them one"
            )
        # `each` marks a map step (`jobs.maps`, which builds on this module).
        if hasattr(before, "each"):
            raise ValueError(
                f"pipeline {name!r}: sleep step {step.name!r} cannot follow map step "
                f"{before.name!r} yet"
            )


def _check_input(pipeline: Pipeline[R]) -> None:
    """Refuse an input model that would accept unknown fields, that claims `event_id`, or
    that lacks a field a step's key names: each would fail later, in a worker."""
    model, name = pipeline.input, pipeline.name
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"pipeline {name!r}: input must be a pydantic model class")
    if model.model_config.get("extra") != "forbid":
        raise ValueError(
            f"pipeline {name!r}: input model {model.__name__} must reject unknown fields: "
            'model_config = ConfigDict(extra="forbid")'
        )
    if "event_id" in model.model_fields:
        raise ValueError(
            f"pipeline {name!r}: event_id is not part of the input; it comes beside it"
        )
    for step in pipeline.steps:
        missing = sorted(step.key_fields() - set(model.model_fields))
        if missing:
            raise ValueError(
                f"pipeline {name!r}: step {step.name!r}'s key names fields {missing} that "
                f"input model {model.__name__} does not have"
            )
        missing = missing_fields(step.limits, model.model_fields)
        if missing:
            raise ValueError(
                f"pipeline {name!r}: step {step.name!r}'s limits name fields {missing} that "
                f"input model {model.__name__} does not have"
            )


def fingerprint(pipeline: str, context: Mapping[str, JSON]) -> str:
    """A stable hash of a pipeline name and a job context (key order does not matter)."""
    canonical = json.dumps([pipeline, context], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class PipelineRegistry:
    """Every declared pipeline, by name; the Celery app binds a task to each step."""

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline[object]] = {}
        self._listeners: list[Callable[[Pipeline[object]], None]] = []

    def add(self, pipeline: Pipeline[R]) -> None:
        """Declare a pipeline (done by `Pipeline` itself); redeclaring a name replaces it."""
        self._pipelines[pipeline.name] = pipeline  # type: ignore[assignment]
        for listener in self._listeners:
            listener(pipeline)  # type: ignore[arg-type]

    def get(self, name: str) -> Pipeline[object]:
        """The pipeline called `name`.

        Raises:
            UnknownPipeline: none was declared under that name.
        """
        try:
            return self._pipelines[name]
        except KeyError:
            raise UnknownPipeline(name) from None

    def on_add(self, listener: Callable[[Pipeline[object]], None]) -> None:
        """Call `listener` for every pipeline declared so far and from now on."""
        self._listeners.append(listener)
        for pipeline in list(self._pipelines.values()):
            listener(pipeline)

    def __contains__(self, name: object) -> bool:
        return name in self._pipelines

    def __iter__(self) -> Iterator[Pipeline[object]]:
        return iter(list(self._pipelines.values()))


#: The process-wide registry every `Pipeline` adds itself to.
registry = PipelineRegistry()


#: The largest magnitude up to which every integer is exactly a float.
_EXACT_FLOATS = 2**53


def json_number(literal: str) -> int | float:
    """A JSON number written with a fraction or an exponent: an int when it is integral (`2.0`,
    `1e3`). JSON and JSON Schema do not tell `2.0` from `2`, so an integer field takes either
    (a float field still gets a float from the model; strings are never numbers)."""
    number = float(literal)
    if number.is_integer() and abs(number) <= _EXACT_FLOATS:
        return int(number)
    return number
