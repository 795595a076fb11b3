"""Turning order-placed events into jobs: parse and validate every event first, then write the
job rows, then publish their first steps.

The job row is committed before anything is sent: the broker never holds the only copy. A
send that fails puts the job in the outbox (`dispatched_at` NULL), which the relay sends later;
a message lost after it was sent, or a crash between the commit and the send, is the
sweeper's to find.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from pydantic import ValidationError

from jobs.dispatch import Dispatch, SendsMany
from jobs.errors import InvalidEvent
from jobs.orders import OrderPlaced, order_job, order_placed
from jobs.pipelines import Delivery, Pipeline
from ledger import JobStore, NewJob, Reading, first_reading

logger = logging.getLogger(__name__)

#: Jobs created, sent and marked dispatched together.
_SLICE = 200


@dataclass(frozen=True)
class Enqueued:
    """One event's job: its id, whether this call created it (False: seen before), and whether
    its first step was published (when not, the job waits in the outbox for the relay)."""

    job_id: str
    created: bool
    sent: bool = True


def parse_events(text: str) -> list[OrderPlaced]:
    """Parse one JSON event, or JSON Lines (one event a line; blank lines are skipped).

    Raises:
        InvalidEvent: naming the line (for JSON Lines) and the field of the first problem.
    """
    return [event for _, event in parse_event_lines(text)]


def parse_event_lines(text: str) -> list[tuple[int | None, OrderPlaced]]:
    """`parse_events`, each event with its line number (None for a single JSON event)."""
    stripped = text.strip()
    if not stripped:
        raise InvalidEvent("no event given (empty input)")
    try:
        whole = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        whole = None
    else:
        if isinstance(whole, dict):
            return [(None, _validate(whole, line=None))]
    events: list[tuple[int | None, OrderPlaced]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON ({exc.msg} at column {exc.colno})", line=number) from None
        except RecursionError:
            raise InvalidEvent("JSON nested too deeply", line=number) from None
        events.append((number, _validate(value, line=number)))
    return events


def _validate(value: object, *, line: int | None) -> OrderPlaced:
    if not isinstance(value, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(value).__name__}", line=line)
    try:
        return OrderPlaced.model_validate(value)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc), line=line) from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a validation error, naming its field (`items[0].quantity: …`)."""
    first = exc.errors()[0]
    field = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    ).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{field or 'event'}: {message}{suffix}"


def start_jobs(
    store: JobStore, dispatch: Dispatch, pipeline: Pipeline[object], new_jobs: Sequence[NewJob]
) -> list[Enqueued]:
    """Create the jobs (deduplicated by event id), then publish the first step of each new one.

    Raises:
        EventConflict: an event id came with other content than before; no job was created.
    """
    # One transaction for the lot: a conflict anywhere in the input creates nothing.
    created = store.create_jobs(new_jobs, dispatched=True)
    answer: list[Enqueued] = []
    # Sent in slices, so a send that failed goes back to the outbox moments later, not after
    # the whole input.
    for start in range(0, len(new_jobs), _SLICE):
        end = start + _SLICE
        answer.extend(
            _send_slice(store, dispatch, pipeline, new_jobs[start:end], created[start:end])
        )
    return answer


def _send_slice(
    store: JobStore,
    dispatch: Dispatch,
    pipeline: Pipeline[object],
    new_jobs: Sequence[NewJob],
    created: Sequence[tuple[UUID, bool]],
) -> list[Enqueued]:
    first = pipeline.steps[0]
    fresh = [str(job_id) for job_id, is_new in created if is_new]
    readings = {}
    if first.delivery is Delivery.READ_ONLY:
        # The job was just written: its first message can bring what reading it would find.
        readings = {
            str(job_id): first_reading(job_id, first.name, job.step_keys[first.name], job.context)
            for job, (job_id, is_new) in zip(new_jobs, created, strict=True)
            if is_new
        }
    unsent = set(_send_first_steps(dispatch, pipeline.name, first.name, fresh, readings))
    for job_id in unsent:
        logger.warning(
            "job %s stored but not sent; the relay will send it",
            job_id,
            extra={"action": "send_failed", "job_id": job_id, "step": first.name},
        )
    # Created as dispatched, to spare a statement per job; those whose send failed go back to
    # the outbox (a crash before this point leaves them to the sweeper instead).
    store.undo_dispatched([UUID(job_id) for job_id in unsent])
    return [Enqueued(str(job_id), is_new, str(job_id) not in unsent) for job_id, is_new in created]


def _send_first_steps(
    dispatch: Dispatch,
    pipeline: str,
    step: str,
    job_ids: Sequence[str],
    readings: Mapping[str, Reading],
) -> list[str]:
    """Publish the first step of each job (with its reading, if the dispatch carries them);
    the job ids whose publish failed."""
    if isinstance(dispatch, SendsMany):
        return dispatch.send_many(pipeline, step, job_ids, readings=readings)
    return send_each(dispatch, pipeline, step, job_ids)


def send_each(dispatch: Dispatch, pipeline: str, step: str, job_ids: Sequence[str]) -> list[str]:
    """Publish a step of each job, one by one; the job ids whose publish failed."""
    unsent = []
    for job_id in job_ids:
        try:
            dispatch.send(pipeline, step, job_id)
        except Exception as exc:  # noqa: BLE001 - the job is stored; the relay sends it
            logger.warning("publishing job %s failed: %s", job_id, exc)
            unsent.append(job_id)
    return unsent


def enqueue_orders(
    store: JobStore, dispatch: Dispatch, events: Sequence[OrderPlaced]
) -> list[Enqueued]:
    """Start one order-placed job per event."""
    pipeline: Pipeline[object] = order_placed  # type: ignore[assignment]
    return start_jobs(store, dispatch, pipeline, [order_job(event) for event in events])
