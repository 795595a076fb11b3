"""The jobs package's exceptions: one root, `JobError`; `TransientError` and `PermanentError`
decide retry (see `jobs/retry.py`), the rest name a situation the CLI or intake reports."""

from __future__ import annotations


class JobError(Exception):
    """Root of every error the jobs package raises."""


class TransientError(JobError):
    """Raised by a step when trying again later may succeed (timeouts, 5xx, 429, connection).

    Args:
        message: what went wrong, for the history.
        retry_after: seconds the other side asked us to wait (`Retry-After`), if it did.
        maybe_applied: whether the request may have taken effect before the failure: True (a
            timeout after sending it, a 503 from a provider that ignores keys), False (the
            connection was refused: nothing went out), or None when the step does not say;
            then the attempt's requests decide (see `jobs.retry.may_have_acted`).
        status: the provider's HTTP status, if it answered one.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        maybe_applied: bool | None = None,
        status: int | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied
        self.status = status
        super().__init__(message)


class PermanentError(JobError):
    """Raised by a step when trying again cannot help (4xx, validation, a declined card).

    Args:
        message: what went wrong, for the history.
        maybe_applied: as for `TransientError`: False for a provider's definite refusal
            (a 402 for a declined card), True for a success whose answer cannot be used (a
            2xx body of the wrong shape), None when the step does not say.
        status: the provider's HTTP status, if it answered one.
    """

    def __init__(
        self, message: str, *, maybe_applied: bool | None = None, status: int | None = None
    ) -> None:
        self.maybe_applied = maybe_applied
        self.status = status
        super().__init__(message)


class InvalidEvent(JobError):
    """Raised when an event (or a line of a JSON Lines file), or a payload given to
    `jobs.enqueue`, is not valid input of its pipeline.

    The message names the line (when there are lines) and the field; `fields` lists every
    problem as `{"field", "message"}` (the webhook's 422 body).
    """

    def __init__(
        self,
        problem: str,
        *,
        line: int | None = None,
        fields: tuple[dict[str, str], ...] = (),
    ) -> None:
        self.problem = problem
        self.line = line
        self.fields = fields
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{problem}")


class UnknownPipeline(JobError):
    """Raised when a job or command names a pipeline nobody declared."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no pipeline named {name!r} is declared")


class ProviderUnavailable(JobError):
    """Raised when the sandbox provider cannot be reached (by the audit, say)."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"provider at {url} is unreachable: {detail}")


class ProcessFailed(JobError):
    """Raised when a process oncelery started (a worker, the sandbox) exits early or never
    answers, or cannot start (its port is taken)."""


class CallDeadLettered(JobError):
    """Raised by a task decorated with `exactly_once` whose call is dead-lettered (its key was
    first used with other arguments, its outcome is unknown, it failed for good): the call
    waits for a person (`oncelery dlq`), and the canvas does not go on.

    Args:
        task: the Celery task's name.
        key: the call's idempotency key.
        job_id: the call's job, as `oncelery history` and `dlq` show it.
        reason: why (a `ledger.DeadLetterReason` value), and what went wrong.
    """

    def __init__(self, task: str, key: str, job_id: str, reason: str, detail: str) -> None:
        self.task, self.key, self.job_id, self.reason = task, key, job_id, reason
        super().__init__(f"{task} call {key!r} (job {job_id}) dead-lettered: {reason}: {detail}")


class NotInCall(JobError):
    """Raised by `idempotency_key()` outside the body of a task decorated with `exactly_once`."""

    def __init__(self) -> None:
        super().__init__("idempotency_key() is only known inside an exactly_once task's body")
