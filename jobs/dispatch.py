"""How a delivery hands a job on: the `Dispatch` the runner publishes through, and the
continuation a step not carried by a message of its own retries through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, Protocol, runtime_checkable


class Dispatch(Protocol):
    """How the runner hands a job on."""

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

    def send_many(self, pipeline: str, step: str, job_ids: Sequence[str]) -> list[str]:
        """Publish `step` of each job; the job ids whose publish failed."""


class HandedBack(Exception):
    """A job's step went back to the broker as a message of its own (a retry, or its key was
    busy): this delivery is done with that job."""


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
