"""What people do with dead letters: plan a replay (which steps are skipped, re-run or refused),
replay, resolve an unknown outcome, purge. The ledger changes state; this module adds what it
cannot know — a pipeline's steps and whether a step's provider honours keys — and sends (a
decorated Celery task's call: its kept message, so that its canvas goes on)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from celery import Celery

from jobs.engine.dispatch import Dispatch, ItemDispatch
from jobs.errors import UnknownPipeline
from jobs.pipelines import Delivery, Step, registry
from jobs.tasks import STEP, is_task_pipeline, resend
from ledger import (
    ACTIVE_JOB_STATES,
    JSON,
    DeadLetter,
    DeadLetterReason,
    DeadLetterState,
    DeadLetterStore,
    EventKind,
    JobNotFound,
    JobState,
    JobStore,
    LedgerError,
    Refused,
    Reopened,
    StepState,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayPlan:
    """What replaying one dead letter would do."""

    letter_id: int
    job_id: str
    pipeline: str
    step: str
    #: Steps already succeeded: their recorded results are reused, they do not run again.
    skip: list[str] = field(default_factory=list)
    #: The failed step and those after it.
    rerun: list[str] = field(default_factory=list)
    #: Why it will not be replayed (None: it will).
    refused: str | None = None

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return {
            "dead_letter": self.letter_id,
            "job_id": self.job_id,
            "pipeline": self.pipeline,
            "step": self.step,
            "skip": list(self.skip),
            "rerun": list(self.rerun),
            "refused": self.refused,
        }


@dataclass(frozen=True)
class ReplayResult:
    """What happened to one dead letter."""

    letter_id: int
    job_id: str
    done: bool
    detail: str

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return {"dead_letter": self.letter_id, "job_id": self.job_id, "done": self.done,
                "detail": self.detail}  # fmt: skip


class DeadLetterDesk:
    """Plans and carries out what people ask of dead letters.

    Args:
        store: the jobs.
        letters: the dead letters.
        dispatch: how a reopened job's step is sent (on the retry queue).
        calls: the Celery app that re-sends a decorated task's call (its kept message names
            its queue); the dispatch's own sender by default.
    """

    def __init__(
        self,
        *,
        store: JobStore,
        letters: DeadLetterStore,
        dispatch: Dispatch,
        calls: Celery | None = None,
    ) -> None:
        self.store = store
        self.letters = letters
        self.dispatch = dispatch
        sender = getattr(dispatch, "sender", None)
        self.calls = calls or (sender if isinstance(sender, Celery) else None)

    def plan(self, letter: DeadLetter, *, force: bool) -> ReplayPlan:
        """What a replay of `letter` would do; changes nothing."""
        base = ReplayPlan(letter.id, str(letter.job_id), letter.pipeline, letter.step)
        try:
            job = self.store.get_job(letter.job_id)
            names, deliveries = _steps_of(letter.pipeline, job.context)
        except (UnknownPipeline, JobNotFound, ValueError) as exc:
            return _refused(base, str(exc))
        if letter.step not in names:
            return _refused(base, f"pipeline {letter.pipeline!r} has no step {letter.step!r}")
        delivery = deliveries[names.index(letter.step)]
        at = names.index(letter.step)
        plan = dataclasses.replace(base, skip=names[:at], rerun=names[at:])
        refusal = self._refusal(letter, job.state, delivery, force=force)
        return _refused(plan, refusal) if refusal else plan

    def _refusal(
        self, letter: DeadLetter, job_state: JobState, delivery: Delivery, *, force: bool
    ) -> str | None:
        if letter.state is not DeadLetterState.OPEN:
            return f"already {letter.state}"
        if job_state is not JobState.DEAD_LETTERED and not (
            item_of(letter) is not None and job_state in ACTIVE_JOB_STATES
        ):
            # A map step's item is dead-lettered on its own: its job goes on meanwhile.
            return f"the job is {job_state}"
        if letter.reason is DeadLetterReason.FINGERPRINT_MISMATCH:
            return "its key was first used for a different request: fix the key, do not replay"
        if delivery is Delivery.AT_MOST_ONCE and self.outcome_unknown(letter) and not force:
            return (
                "the step's outcome is unknown and its provider ignores keys: "
                "check the provider, then replay --force or resolve"
            )
        return None

    def outcome_unknown(self, letter: DeadLetter) -> bool:
        """Whether the letter's key is `unknown` (whatever its reason: a call its time limit
        killed, say): nobody knows whether its step took effect."""
        if letter.key is None:
            return False
        if item_of(letter) is not None:
            # An item's entry is not in its job's history (a map may have 100,000).
            step = [(letter.pipeline, letter.step)]
            found = self.store.entries_of_steps(step, keys=[letter.key])
            return any(entry.state is StepState.UNKNOWN for _, entry in found)
        entries = self.store.history(letter.job_id).entries
        return any(e.key == letter.key and e.state is StepState.UNKNOWN for e in entries)

    def replay(self, letter: DeadLetter, *, by: str, force: bool) -> ReplayResult:
        """Replay one dead letter: the job resumes at the failed step, on the retry queue."""
        plan = self.plan(letter, force=force)
        if plan.refused:
            return ReplayResult(letter.id, str(letter.job_id), False, plan.refused)
        # An exactly-once step may run again even if its outcome is unknown: the provider's
        # key turns a repeat into the first answer.
        outcome = self.letters.replay(letter.id, by=by, allow_unknown=True)
        return self._send(outcome, letter)

    def retry(self, letter: DeadLetter, *, by: str) -> ReplayResult:
        """A person decided the step did not take effect: run it again (`resolve --as retry`)."""
        outcome = self.letters.replay(
            letter.id, by=by, allow_unknown=True, event=EventKind.RESOLVED
        )
        return self._send(outcome, letter)

    def resolve(self, letter: DeadLetter, *, by: str, result: JSON) -> ReplayResult:
        """A person decided the step did take effect (`resolve --as succeeded`): record
        `result` as its outcome and move the job on. An item's letter settles its item as
        done (its job goes on; the join is sent if that settled the map's last item)."""
        try:
            following = _next_step(letter)
        except UnknownPipeline as exc:
            return ReplayResult(letter.id, str(letter.job_id), False, str(exc))
        outcome = self.letters.settle(
            letter.id, by=by, result=result, next_step=following.name if following else None
        )
        if isinstance(outcome, Refused):
            return ReplayResult(letter.id, str(letter.job_id), False, outcome.reason)
        if is_task_pipeline(letter.pipeline):
            # Its kept message again: the call answers the person's result, and the canvas
            # after it goes on.
            return self._send(outcome, letter)
        done = f"item {outcome.item_id} done; " if outcome.item_id is not None else ""
        if outcome.next_step is not None and outcome.job_state is JobState.RUNNING:
            self.dispatch.send(
                outcome.pipeline, outcome.next_step, str(outcome.job_id), resend=True
            )
            return ReplayResult(
                letter.id, str(letter.job_id), True, f"{done}resumed at {outcome.next_step}"
            )
        return ReplayResult(letter.id, str(letter.job_id), True, f"{done}job {outcome.job_state}")

    def _send(self, outcome: object, letter: DeadLetter) -> ReplayResult:
        if isinstance(outcome, Refused):
            return ReplayResult(letter.id, str(letter.job_id), False, outcome.reason)
        if isinstance(outcome, Reopened) and outcome.item_id is not None:
            return self._send_item(letter, outcome.item_id)
        try:
            if is_task_pipeline(letter.pipeline):
                self._resend_call(letter)
            else:
                self.dispatch.send(letter.pipeline, letter.step, str(letter.job_id), resend=True)
        except Exception as exc:  # noqa: BLE001 - reopened in Postgres: the sweeper sends it
            detail = f"reopened, but not sent ({exc}); the sweeper will send it"
            return ReplayResult(letter.id, str(letter.job_id), True, detail)
        logger.info(
            "replayed dead letter %s",
            letter.id,
            extra={"action": "replay", "job_id": str(letter.job_id), "step": letter.step},
        )
        return ReplayResult(letter.id, str(letter.job_id), True, f"resumed at {letter.step}")

    def _send_item(self, letter: DeadLetter, item_id: str) -> ReplayResult:
        """Send a replayed item alone (pending again in Postgres, in the outbox: if this send
        fails, the sweeper sends it), then take it out of the outbox."""
        job_id = str(letter.job_id)
        unsent: list[str] = [item_id]
        if isinstance(self.dispatch, ItemDispatch):
            try:
                unsent = self.dispatch.send_items(
                    letter.pipeline, letter.step, job_id, [item_id], resend=True
                )
            except Exception:
                logger.warning("replayed item %s not sent", item_id, exc_info=True)
        if unsent or letter.key is None:
            detail = f"item {item_id} reopened, but not sent; the sweeper will send it"
            return ReplayResult(letter.id, job_id, True, detail)
        try:
            self.letters.item_sent(letter.job_id, letter.step, letter.key)
        except LedgerError as exc:  # sent: the sweeper's copy is absorbed by its claim
            logger.warning("replayed item %s sent, but left in the outbox: %s", item_id, exc)
        return ReplayResult(letter.id, job_id, True, f"item {item_id} resumed at {letter.step}")

    def _resend_call(self, letter: DeadLetter) -> None:
        if self.calls is None:
            raise RuntimeError("no Celery app to send the call through")
        resend(self.calls, self.store.get_job(letter.job_id).context.get("message"))


def _steps_of(pipeline: str, context: Mapping[str, JSON]) -> tuple[list[str], list[Delivery]]:
    """A job's steps and their deliveries: its pipeline's, or a decorated task's call's (one
    step, its delivery kept in the job's context).

    Raises:
        UnknownPipeline: no pipeline of that name is declared here.
        ValueError: the call's kept delivery is not one.
    """
    if is_task_pipeline(pipeline):
        return [STEP], [Delivery(str(context.get("delivery", Delivery.EXACTLY_ONCE)))]
    steps = registry.get(pipeline).steps
    return [step.name for step in steps], [step.delivery for step in steps]


def _next_step(letter: DeadLetter) -> Step[object] | None:
    if is_task_pipeline(letter.pipeline):
        return None
    return registry.get(letter.pipeline).next_step(letter.step)


def item_of(letter: DeadLetter) -> str | None:
    """The item of a map step a dead letter is (None: a job's step)."""
    found = letter.input.get("item_id") if isinstance(letter.input, dict) else None
    return found if isinstance(found, str) else None


def _refused(plan: ReplayPlan, reason: str) -> ReplayPlan:
    return dataclasses.replace(plan, refused=reason)


def letter_view(letter: DeadLetter) -> dict[str, JSON]:
    """A dead letter as `dlq list/show --json` prints it."""
    return {
        "id": letter.id,
        "job_id": str(letter.job_id),
        "pipeline": letter.pipeline,
        "step": letter.step,
        "key": letter.key,
        "item_id": item_of(letter),
        "state": str(letter.state),
        "reason": str(letter.reason),
        "error_type": letter.error_type,
        "message": letter.message,
        "traceback": letter.traceback,
        "input": letter.input,
        "attempts": letter.attempts,
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat(),
        "closed_at": letter.closed_at.isoformat() if letter.closed_at else None,
        "closed_by": letter.closed_by,
    }
