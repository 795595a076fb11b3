"""A run of a step: what its jobs share (`Run`), how each ended (`Outcome`), the stage of
steps it is at, and the small helpers every part of a run uses."""

from __future__ import annotations

import enum
import logging
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar
from uuid import UUID

from jobs.engine.dispatch import Continuation, Dispatch, HandedBack
from jobs.engine.runtime import Runtime
from jobs.maps import is_map
from jobs.pipelines import Delivery, Pipeline, Step
from ledger import (
    JSON,
    Claim,
    ClaimOutcome,
    LedgerError,
    LimitRules,
    Reading,
    ReadResult,
    StepResult,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: Bounds one attempt of a step in time, given its limit in seconds (a batch's steps run
#: under no task time limit of their own).
StepTimer = Callable[[float], AbstractContextManager[object]]


class Outcome(enum.StrEnum):
    """How one job's run of a step ended."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    #: The key was already recorded: a duplicate, absorbed by the ledger.
    DUPLICATE = "duplicate"
    #: The job may not run (finished, cancelled, dead-lettered, missing).
    INACTIVE = "inactive"
    #: The lease was taken over while acting: this owner neither records nor continues.
    FENCED = "fenced"
    #: A batch could not finish with this job (an unexpected error, the database gone): its
    #: message goes back to the broker, to be redelivered alone.
    INTERRUPTED = "interrupted"
    #: Its limit had no token or slot free: a timer sends it again (no attempt used).
    WAITING = "waiting"


@dataclass
class Run:
    """One run of a step: what all of its jobs share."""

    rt: Runtime
    dispatch: Dispatch
    pipeline: Pipeline[object]
    #: The step the run was for.
    first: Step[object]
    #: The run is one task message: `dispatch.retry_later` re-sends it.
    own_message: bool
    timer: StepTimer | None
    #: The places of jobs whose message may repeat an attempt (redelivered after its worker
    #: died, or sent again: a retry, a re-drive, a replay): they are claimed, even at a
    #: read-only step, so that every such attempt is counted.
    repeats: frozenset[int] = frozenset()
    #: The readings jobs' messages brought (their first step's, from the enqueue), by place
    #: in the run: those jobs are not read again.
    brought: dict[int, Reading] = field(default_factory=dict)
    #: Each job's outcome, by its place in the run.
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    #: The claims whose leases are kept while the run goes on (see `hold`).
    held: list[Claim] = field(default_factory=list)

    def hold(self, found: Sequence[object]) -> None:
        """Keep the leases of the claims among `found` until the run ends (a claim
        recorded meanwhile is dropped by the keeper's next renewal)."""
        claims = [each for each in found if isinstance(each, Claim)]
        self.held.extend(claims)
        self.rt.leases.hold(claims)

    def dispatch_for(self, step: Step[object], job_id: str) -> Dispatch:
        """How a job at `step` is handed on from here."""
        if self.own_message and step is self.first:
            return self.dispatch
        return Continuation(self.dispatch, self.pipeline.name, step.name, job_id)


@dataclass
class Stage:
    """One step of a run's jobs: each job's claim outcome, ready to act on."""

    step: Step[object]
    #: (place in the run, job id, what claiming, or reading, found — or None: not
    #: claimed yet, the job claims just before it acts; see `jobs.engine.run`).
    found: Sequence[tuple[int, str, ClaimOutcome | Reading | LedgerError | None]]


@dataclass(frozen=True)
class Acted:
    """A job whose step succeeded, waiting for its record."""

    index: int
    done: StepResult | ReadResult

    @property
    def held(self) -> Claim | Reading:
        """The claim it acted under (or the reading of a read-only step)."""
        return self.done.claim if isinstance(self.done, StepResult) else self.done.reading

    @property
    def job_id(self) -> str:
        return str(self.held.job_id)


def guarded(run: Run, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | Outcome:
    """`call(...)` for one job: handed back to the broker meanwhile, it is retrying. In a
    batch, an error about this job stops this job alone (its message goes back to the
    broker); a task message lets it propagate, as it always did."""
    try:
        return call(*args, **kwargs)
    except HandedBack:
        return Outcome.RETRYING
    except Exception:
        if run.own_message:
            raise
        logger.exception("a job of a batch was interrupted", extra={"action": "job_interrupted"})
        return Outcome.INTERRUPTED


def claim_alone(run: Run, step: Step[object], job: UUID) -> ClaimOutcome | LedgerError:
    [found] = run.rt.ledger.claim_steps(
        [job], step.name, takeover_expired=takes_over(step), limits=step_limits(run, step)
    )
    return found


def step_limits(run: Run, step: Step[object]) -> LimitRules | None:
    """The limits a claim of `step` itself takes (a map step's are its items')."""
    return None if is_map(step) else run.rt.limits_for(run.pipeline.name, step)


def takes_over(step: Step[object]) -> bool:
    """Whether a claim of `step` may take over a key whose owner's lease ran out (an
    at-most-once step's expired key may have acted: it is unknown instead)."""
    # A map step's own run only computes its items (its delivery is its items'): taken over.
    return step.delivery is not Delivery.AT_MOST_ONCE or is_map(step)


def error_json(exc: BaseException, *, retryable: bool) -> dict[str, JSON]:
    error: dict[str, JSON] = {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "retryable": retryable,
    }
    if not retryable:
        error["traceback"] = "".join(traceback.format_exception(exc))[-8000:]
    return error


def message_of(error: JSON) -> str:
    return str(error.get("message", "")) if isinstance(error, dict) else str(error)


def log_fields(claim: Claim | Reading) -> dict[str, object]:
    return {
        "job_id": str(claim.job_id),
        "step": claim.step,
        "key": claim.key,
        "attempt": claim.attempt,
    }
