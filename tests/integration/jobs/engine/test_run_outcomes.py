"""What a failed attempt leaves on its key: `failed` (nothing can have been applied, so it may
run again) or `unknown` (an effect may exist). Any failure after a request that may apply an
effect went out — a 2xx body of the wrong shape, a result that is not JSON, a bug after the
call, a 5xx/409/429 from a provider that ignores keys — must leave an at-most-once step
`unknown`, so that no replay repeats it unasked (DESIGN.md invariant 3)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pytest

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.errors import PermanentError, TransientError
from jobs.ops.dead_letters import DeadLetterDesk
from jobs.outside import request_sent
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from ledger import JSON, DeadLetterStore, StepState
from tests.factories import RecordingDispatch, RetryRequested

_names = itertools.count()


@dataclass
class Provider:
    """What the step's call does: whether a request went out, then what the step gets."""

    answer: Callable[[], object]
    sends: bool = True


def charging_pipeline(
    provider: Provider, delivery: Delivery, unapplied: frozenset[int] = frozenset()
) -> Pipeline[Provider]:
    def charge(ctx: StepContext[Provider]) -> JSON:
        if ctx.resources.sends:
            request_sent()
        return cast(JSON, ctx.resources.answer())

    return Pipeline(
        name=f"outcomes-{next(_names)}",
        steps=[
            Step(
                "charge",
                charge,
                key="o:{order}:charge",
                delivery=delivery,
                effect="charge",
                unapplied_statuses=unapplied,
            )
        ],
        resources=lambda _settings: provider,
    )


def charge_once(runtime: Runtime, provider: Provider, delivery: Delivery, **kw: object) -> str:
    pipeline = charging_pipeline(provider, delivery, **kw)  # type: ignore[arg-type]
    [(job_id, _)] = runtime.store.create_jobs(
        [pipeline.new_job(f"evt-{uuid.uuid4().hex}", {"order": uuid.uuid4().hex[:8]})]
    )
    dispatch = RecordingDispatch()
    step = pipeline.step("charge")
    try:
        outcome = run_step(runtime, dispatch, pipeline, step, str(job_id))  # type: ignore[arg-type]
    except RetryRequested:
        outcome = Outcome.RETRYING
    return f"{outcome}:{key_state(runtime, str(job_id))}"


def key_state(runtime: Runtime, job_id: str) -> StepState:
    [entry] = runtime.store.history(uuid.UUID(job_id)).entries
    return entry.state


def raises(error: Exception) -> Callable[[], object]:
    def answer() -> object:
        raise error

    return answer


_AFTER_THE_CALL: dict[str, Callable[[], object]] = {
    "2xx of the wrong shape": raises(PermanentError("charge.id is not a string")),
    "2xx not an object": raises(PermanentError("answered 200, not an object", maybe_applied=True)),
    "result that is not JSON": lambda: {"charge": object()},
    "bug after the call": raises(KeyError("id")),
    "503 from a provider that ignores keys": raises(
        TransientError("answered 503", maybe_applied=True, status=503)
    ),
    "429": raises(TransientError("answered 429", maybe_applied=True, status=429)),
    "409": raises(TransientError("answered 409", maybe_applied=True, status=409)),
}


@pytest.mark.parametrize("failure", list(_AFTER_THE_CALL))
def test_an_at_most_once_step_that_failed_after_its_call_is_unknown(
    runtime: Runtime, failure: str
) -> None:
    provider = Provider(_AFTER_THE_CALL[failure])

    assert charge_once(runtime, provider, Delivery.AT_MOST_ONCE) == "dead_lettered:unknown"


@pytest.mark.parametrize(
    "failure",
    [
        "2xx of the wrong shape",
        "2xx not an object",
        "result that is not JSON",
        "bug after the call",
    ],
)
def test_an_exactly_once_step_that_gave_up_after_its_call_is_unknown(
    runtime: Runtime, failure: str
) -> None:
    """Its effect may exist, so the key says so; its provider's key makes a replay safe."""
    provider = Provider(_AFTER_THE_CALL[failure])

    assert charge_once(runtime, provider, Delivery.EXACTLY_ONCE) == "dead_lettered:unknown"


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        # Refused before anything went out, or refused for certain: free to run again.
        (
            Provider(raises(TransientError("cannot connect", maybe_applied=False))),
            "retrying:failed",
        ),
        (
            Provider(raises(PermanentError("402 declined", maybe_applied=False, status=402))),
            "dead_lettered:failed",
        ),
        # Raised by the step before it sent anything.
        (
            Provider(raises(PermanentError("gather's result is not an object")), sends=False),
            "dead_lettered:failed",
        ),
    ],
    ids=["refused connection", "definite 402", "before the call"],
)
def test_a_failure_that_applied_nothing_leaves_the_key_failed(
    runtime: Runtime, provider: Provider, expected: str
) -> None:
    assert charge_once(runtime, provider, Delivery.AT_MOST_ONCE) == expected


def test_a_status_the_step_declares_unapplied_is_retried(runtime: Runtime) -> None:
    provider = Provider(raises(TransientError("answered 429", maybe_applied=True, status=429)))

    outcome = charge_once(runtime, provider, Delivery.AT_MOST_ONCE, unapplied=frozenset({429}))

    assert outcome == "retrying:failed"


def test_an_unknown_at_most_once_step_is_not_replayed_unasked(runtime: Runtime) -> None:
    provider = Provider(_AFTER_THE_CALL["2xx of the wrong shape"])
    charge_once(runtime, provider, Delivery.AT_MOST_ONCE)
    letters = DeadLetterStore(engine=runtime.engine)
    [letter] = letters.list()
    desk = DeadLetterDesk(store=runtime.store, letters=letters, dispatch=RecordingDispatch())

    assert key_state(runtime, str(letter.job_id)) is StepState.UNKNOWN
    assert desk.plan(letter, force=False).refused is not None
    assert desk.plan(letter, force=True).refused is None
