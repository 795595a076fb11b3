"""The retry policy: which errors are worth retrying, and how long to wait before the next try.
Retry is decided here, by exception type, and nowhere else."""

from __future__ import annotations

import random
from dataclasses import dataclass

from config.settings import StepPolicy
from jobs.errors import PermanentError, TransientError


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a step is tried.

    Args:
        max_attempts: attempts in all (crashed ones included) before the job is dead-lettered.
        backoff_base: the ceiling of the first retry's delay, in seconds; it doubles per attempt.
        backoff_max: the ceiling of any delay, in seconds.
    """

    max_attempts: int = 8
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        # Written as "not >" so that NaN, which compares false with everything, is refused.
        if not (self.max_attempts >= 1 and self.backoff_base > 0 and self.backoff_max > 0):
            raise ValueError(f"invalid retry policy: {self}")


def effective_policy(
    default: RetryPolicy, in_code: RetryPolicy | None, configured: StepPolicy | None
) -> RetryPolicy:
    """A step's policy: the settings' override field by field, else the step's own, else the
    default."""
    base = in_code or default
    if configured is None:
        return base
    return RetryPolicy(
        max_attempts=configured.max_attempts or base.max_attempts,
        backoff_base=configured.backoff_base or base.backoff_base,
        backoff_max=configured.backoff_max or base.backoff_max,
    )


@dataclass(frozen=True)
class Verdict:
    """What to do after a failed attempt: retry after `delay` seconds, or give up (None)."""

    delay: float | None
    reason: str


#: Errors worth retrying, beyond `TransientError`: the standard library's connection errors and
#: timeouts, and the time limits of whoever runs the steps (`treat_as_transient`).
_TRANSIENT: list[type[BaseException]] = [TransientError, ConnectionError, TimeoutError]


def treat_as_transient(error: type[BaseException]) -> None:
    """Retry steps that fail with `error` too: the worker registers its soft time limit
    (Celery's), which the Celery-free engine cannot name."""
    if error not in _TRANSIENT:
        _TRANSIENT.append(error)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: `TransientError`, a step's soft time limit, and the
    standard library's connection errors and timeouts. Anything else, a bug included, is
    permanent: retrying a bug only repeats it, and the dead letter waits for the fix."""
    return isinstance(exc, tuple(_TRANSIENT))


def may_have_acted(
    exc: BaseException, *, sent: bool, unapplied_statuses: frozenset[int] = frozenset()
) -> bool:
    """Whether a failed attempt may have changed the outside world before failing.

    Args:
        exc: what ended the attempt.
        sent: whether the attempt reported a request that may apply an effect
            (`jobs.outside.request_sent`).
        unapplied_statuses: provider statuses the step declares to mean "nothing applied".

    What the error says wins (a refused connection, a definite 4xx: no; a timeout after
    sending: yes), save a status the step declares unapplied. An error the step raised
    without saying may have acted if a request went out before it. Anything else — a bug, a
    time limit, a result that is not JSON — may have acted: nothing tells what happened
    before it.
    """
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status in unapplied_statuses:
        return False
    if isinstance(exc, TransientError | PermanentError):
        return exc.maybe_applied if exc.maybe_applied is not None else sent
    return True


def backoff(attempt: int, policy: RetryPolicy, draw: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base · 2^(attempt-1))], a
    pure function of the attempt number and a random draw.

    Args:
        attempt: the attempt that just failed, from 1.
        policy: the step's policy.
        draw: a number in [0, 1), e.g. `random.random()`.
    """
    exponent = min(attempt - 1, 62)
    ceiling = min(policy.backoff_max, policy.backoff_base * (2.0**exponent))
    return ceiling * draw


def decide(
    exc: BaseException,
    attempt: int,
    policy: RetryPolicy,
    rng: random.Random | None = None,
    *,
    retry_after_max: float | None = None,
) -> Verdict:
    """Whether, and when, to try again after `exc` ended attempt number `attempt`.

    Args:
        retry_after_max: the longest wait a `Retry-After` may ask for (None: the policy's
            `backoff_max`, for a retry that can only wait as a countdown). Our own backoff
            is capped at `backoff_max`; the other side's wish is honoured up to this.
    """
    if isinstance(exc, PermanentError) or not is_transient(exc):
        return Verdict(None, "permanent")
    if attempt >= policy.max_attempts:
        return Verdict(None, "attempts_exhausted")
    delay = backoff(attempt, policy, (rng or random).random())
    retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    if retry_after is not None:
        # The other side said when it can take us again: never sooner, within the cap.
        cap = policy.backoff_max if retry_after_max is None else retry_after_max
        delay = max(delay, min(retry_after, cap))
    return Verdict(delay, "transient")
