"""How a run hands a job on: the `Dispatch` a run publishes through, and the
continuation a step not carried by a message of its own retries through."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Final, NoReturn, Protocol, runtime_checkable
from uuid import UUID

from ledger import Reading, first_reading

#: The message header in which a job's first message brings its first step's reading (when
#: that step is read-only): the step then runs without reading its job (see `ledger.Reading`).
READING_HEADER: Final = "oncelery_reading"
#: Readings longer than this (characters of JSON) stay in the ledger: a message header must
#: fit in one RabbitMQ frame, and a big one slows every hop.
READING_LIMIT: Final = 8192


class Dispatch(Protocol):
    """How a run hands a job on: publishing through the broker."""

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        """Publish a step of a job (`resend`: it was sent before, e.g. a replay or a re-drive,
        so it travels on the retry queue; `countdown`: not before that many seconds)."""

    def retry_later(self, delay: float) -> NoReturn:
        """Publish the current step again after `delay` seconds, and end this attempt."""


@runtime_checkable
class SendsMany(Protocol):
    """A dispatch that publishes a step of many jobs in one go (`CeleryDispatch`)."""

    def send_many(
        self,
        pipeline: str,
        step: str,
        job_ids: Sequence[str],
        *,
        readings: Mapping[str, Reading] | None = None,
    ) -> list[str]:
        """Publish `step` of each job (with its reading, by job id, if given: see
        `READING_HEADER`); the job ids whose publish failed."""


#: Items of a map step one message carries: a redelivery repeats a few claims, not many,
#: and the items of a big map still spread over every worker.
ITEMS_PER_MESSAGE: Final = 20


@runtime_checkable
class ItemDispatch(Protocol):
    """A dispatch that publishes a map step's items (`CeleryDispatch`)."""

    def send_items(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        item_ids: Sequence[str],
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> list[str]:
        """Publish items of a job's map step (several to a message); the item ids whose
        publish failed (they stay in the outbox, for the sweeper)."""


def reading_header(reading: Reading) -> str | None:
    """A reading as its message carries it (None when too long to carry)."""
    text = json.dumps({"key": reading.key, "context": reading.context}, separators=(",", ":"))
    return text if len(text) <= READING_LIMIT else None


def message_reading(header: object, job_id: str, step: str) -> Reading | None:
    """The reading a message brought for its job's `step`; None if it brought none, or one
    that is not well formed (the step then reads its job, as without)."""
    if not isinstance(header, str):
        return None
    try:
        found = json.loads(header)
        key, context = found["key"], found["context"]
        job = UUID(job_id)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not isinstance(key, str) or not isinstance(context, dict):
        return None
    return first_reading(job, step, key, context)


class HandedBack(Exception):
    """A job's step went back to the broker as a message of its own (a retry, or its key was
    busy): this run is done with that job."""


class Continuation:
    """The dispatch of a step that did not come in a message of its own (reached by the fast
    path, or carried in a batch): its "retry later" publishes it as a task of its own."""

    def __init__(self, dispatch: Dispatch, pipeline: str, step: str, job_id: str) -> None:
        self.dispatch, self.pipeline, self.step, self.job_id = dispatch, pipeline, step, job_id

    def send(
        self,
        pipeline: str,
        step: str,
        job_id: str,
        *,
        resend: bool = False,
        countdown: float | None = None,
    ) -> None:
        self.dispatch.send(pipeline, step, job_id, resend=resend, countdown=countdown)

    def retry_later(self, delay: float) -> NoReturn:
        self.dispatch.send(self.pipeline, self.step, self.job_id, resend=True, countdown=delay)
        raise HandedBack(self.step)
