"""`jobs.retry`: exponential backoff with full jitter, and the retry verdict by exception type."""

from __future__ import annotations

import math
import random

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import jobs.worker.time_limits  # noqa: F401 - registers Celery's soft time limit as transient
from jobs.engine.timers import waits_as_timer
from jobs.errors import InvalidEvent, PermanentError, TransientError
from jobs.retry import RetryPolicy, Verdict, backoff, decide, is_transient, may_have_acted

POLICY = RetryPolicy(max_attempts=4, backoff_base=0.5, backoff_max=30.0)

_policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(min_value=1, max_value=100),
    backoff_base=st.floats(min_value=1e-3, max_value=3_600),
    backoff_max=st.floats(min_value=1e-3, max_value=86_400),
)
_draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def _ceiling(attempt: int, policy: RetryPolicy) -> float:
    """min(max, base · 2^(attempt-1)), computed without overflowing."""
    if attempt - 1 >= 1_024:
        return policy.backoff_max
    return min(policy.backoff_max, policy.backoff_base * 2.0 ** (attempt - 1))


class FixedDraw(random.Random):
    """A random source whose every draw is the same number."""

    def __init__(self, draw: float) -> None:
        super().__init__()
        self.draw = draw

    def random(self) -> float:
        return self.draw


# --- backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "draw", "delay"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 0.25),
        (2, 0.5, 0.5),
        (3, 0.5, 1.0),
        (6, 0.5, 8.0),
        (7, 0.5, 15.0),  # ceiling 32 capped at 30
        (10**9, 0.5, 15.0),
    ],
)
def test_backoff_examples(attempt: int, draw: float, delay: float) -> None:
    assert backoff(attempt, POLICY, draw) == delay


@hypothesis_settings(max_examples=300, deadline=None)
@given(attempt=st.integers(min_value=1, max_value=5_000), policy=_policies, draw=_draws)
def test_backoff_stays_within_full_jitter_bounds(
    attempt: int, policy: RetryPolicy, draw: float
) -> None:
    delay = backoff(attempt, policy, draw)

    assert 0.0 <= delay <= _ceiling(attempt, policy)
    assert math.isfinite(delay)


@hypothesis_settings(max_examples=200, deadline=None)
@given(attempt=st.integers(min_value=1, max_value=200), policy=_policies, draw=_draws)
def test_backoff_never_shrinks_with_more_attempts(
    attempt: int, policy: RetryPolicy, draw: float
) -> None:
    assert backoff(attempt, policy, draw) <= backoff(attempt + 1, policy, draw)


# --- decide: what never retries -------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("card declined"),
        InvalidEvent("items: unknown field"),
        ValueError("a bug"),
        KeyError("total"),
        ZeroDivisionError("division by zero"),
        RuntimeError("boom"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_permanent_and_unknown_errors_never_retry(error: Exception) -> None:
    assert is_transient(error) is False
    assert decide(error, 1, POLICY) == Verdict(None, "permanent")


# --- decide: what retries until the attempts run out ----------------------------------------


_TRANSIENT = [
    TransientError("503"),
    # Celery's soft time limit, which the worker registers (`jobs.worker.time_limits`).
    SoftTimeLimitExceeded(),
    ConnectionError("reset"),
    ConnectionRefusedError("refused"),
    TimeoutError("slow"),
    BrokenPipeError("gone"),
]


@pytest.mark.parametrize("error", _TRANSIENT, ids=lambda error: type(error).__name__)
def test_transient_errors_retry_until_max_attempts(error: Exception) -> None:
    verdicts = [decide(error, attempt, POLICY, FixedDraw(0.5)) for attempt in range(1, 6)]

    assert is_transient(error) is True
    assert verdicts == [
        Verdict(0.25, "transient"),
        Verdict(0.5, "transient"),
        Verdict(1.0, "transient"),
        Verdict(None, "attempts_exhausted"),
        Verdict(None, "attempts_exhausted"),
    ]


def test_one_attempt_policy_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)

    assert decide(TransientError("503"), 1, policy) == Verdict(None, "attempts_exhausted")


def test_the_random_source_draws_the_jitter() -> None:
    rng, twin = random.Random(7), random.Random(7)

    verdict = decide(TimeoutError(), 3, POLICY, rng)

    assert verdict == Verdict(backoff(3, POLICY, twin.random()), "transient")


# --- decide: Retry-After --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "draw", "delay"),
    [
        (10.0, 0.0, 10.0),  # never sooner than asked
        (0.1, 0.5, 0.5),  # the backoff already waits longer
        (100.0, 0.0, 30.0),  # capped at backoff_max
        (0.0, 0.0, 0.0),
    ],
)
def test_retry_after_is_honoured_within_the_cap(
    retry_after: float, draw: float, delay: float
) -> None:
    error = TransientError("429", retry_after=retry_after)

    assert decide(error, 2, POLICY, FixedDraw(draw)) == Verdict(delay, "transient")


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (3600.0, 3600.0),  # honoured in full: it waits as a timer
        (10.0, 10.0),
        (10 * 86_400.0, 86_400.0),  # up to the longest wait allowed
    ],
)
def test_a_retry_after_that_may_wait_as_a_timer_is_honoured_in_full(
    retry_after: float, delay: float
) -> None:
    error = TransientError("429", retry_after=retry_after)

    verdict = decide(error, 2, POLICY, FixedDraw(0.0), retry_after_max=86_400.0)

    assert verdict == Verdict(delay, "transient")


@pytest.mark.parametrize(
    ("delay", "timer"),
    [(None, False), (0.5, False), (30.0, False), (30.5, True), (3600.0, True)],
)
def test_a_delay_past_the_countdown_limit_waits_as_a_timer(
    delay: float | None, timer: bool
) -> None:
    assert waits_as_timer(delay, POLICY, 30.0) is timer
    # The step's own backoff_max bounds its countdowns too (only a Retry-After passes it).
    short = RetryPolicy(max_attempts=4, backoff_base=0.5, backoff_max=1.0)
    assert waits_as_timer(delay, short, 30.0) is (delay is not None and delay > 1.0)


def test_retry_after_does_not_outlast_the_attempts() -> None:
    error = TransientError("429", retry_after=5.0)

    assert decide(error, 4, POLICY) == Verdict(None, "attempts_exhausted")


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=120),
    policy=_policies,
    draw=_draws,
    retry_after=st.none() | st.floats(min_value=0.0, max_value=1e9),
)
def test_verdict_delay_bounds(
    attempt: int, policy: RetryPolicy, draw: float, retry_after: float | None
) -> None:
    verdict = decide(TransientError("x", retry_after=retry_after), attempt, policy, FixedDraw(draw))

    if attempt >= policy.max_attempts:
        assert verdict == Verdict(None, "attempts_exhausted")
        return
    assert verdict.reason == "transient"
    assert verdict.delay is not None
    assert 0.0 <= verdict.delay <= policy.backoff_max
    if retry_after is None:
        assert verdict.delay <= _ceiling(attempt, policy)
    else:
        assert verdict.delay >= min(retry_after, policy.backoff_max)


# --- RetryPolicy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [{"max_attempts": 0}, {"backoff_base": 0.0}, {"backoff_max": -1.0}],
    ids=["no-attempts", "zero-base", "negative-max"],
)
def test_an_impossible_policy_is_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


def test_a_nan_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(backoff_base=math.nan)


# --- may_have_acted -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "sent", "acted"),
    [
        # What the error says wins.
        (TransientError("connection refused", maybe_applied=False), True, False),
        (TransientError("no answer in time", maybe_applied=True), False, True),
        (PermanentError("402 declined", maybe_applied=False, status=402), True, False),
        (PermanentError("200, not an object", maybe_applied=True), False, True),
        # An error the step raised without saying: did a request go out before it?
        (PermanentError("gather's result is not an object"), False, False),
        (PermanentError("charge.id is not a string"), True, True),
        (TransientError("busy"), True, True),
        # A bug, a result that is not JSON, a time limit: nothing tells, so it may have.
        (KeyError("id"), False, True),
        (TypeError("Object of type object is not JSON serializable"), False, True),
        (SoftTimeLimitExceeded(), False, True),
    ],
)
def test_may_have_acted(error: Exception, sent: bool, acted: bool) -> None:
    assert may_have_acted(error, sent=sent) is acted


def test_a_status_the_step_declares_unapplied_did_not_act() -> None:
    busy = TransientError("429", maybe_applied=True, status=429)

    assert may_have_acted(busy, sent=True, unapplied_statuses=frozenset({429})) is False
    assert may_have_acted(busy, sent=True, unapplied_statuses=frozenset({503})) is True
