"""What a step message must carry (one argument: its job's id, a UUID), and what becomes of one
that cannot be run: rejected once, never requeued, logged with its task and why, and counted."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from jobs.engine.runtime import Runtime
from ledger import MalformedMessages

logger = logging.getLogger(__name__)

#: How much of a bad value a log line or a count's detail shows.
_SHOWN: Final = 80


class MalformedReason(enum.StrEnum):
    """Why a step message cannot be run (the metric's `reason` label)."""

    #: Not exactly one positional argument (keyword arguments, none, several).
    ARGUMENTS = "arguments"
    #: Its one argument is not a UUID.
    JOB_ID = "job_id"
    #: A well-formed UUID, but no job has it (acknowledged, not rejected: nothing is wrong
    #: with the message's form, and a pruned job's late duplicate is one).
    NO_SUCH_JOB = "no_such_job"


@dataclass(frozen=True)
class Malformed:
    """A step message that cannot be run, and why."""

    reason: MalformedReason
    detail: str


def task_name(pipeline: str, step: str) -> str:
    """The Celery task name of a pipeline's step."""
    return f"oncelery.{pipeline}.{step}"


def item_task_name(pipeline: str, step: str) -> str:
    """The Celery task name of a map step's items."""
    return f"oncelery.{pipeline}.{step}.items"


def items_of(args: object, kwargs: object) -> tuple[str, list[str]] | Malformed:
    """The job id and item ids an item message carries (as `args=[job_id, [item_id, …]]`),
    or why it carries none."""
    if kwargs or not isinstance(args, Sequence) or isinstance(args, str) or len(args) != 2:
        return Malformed(
            MalformedReason.ARGUMENTS,
            f"arguments {_shown(args)}: an item message takes the job id and a list of item ids",
        )
    job_id = job_id_of(args[:1], {})
    if isinstance(job_id, Malformed):
        return job_id
    item_ids = args[1]
    if not isinstance(item_ids, list) or not all(isinstance(i, str) and i for i in item_ids):
        return Malformed(MalformedReason.ARGUMENTS, f"item ids {_shown(item_ids)}: not strings")
    return job_id, item_ids


def job_id_of(args: object, kwargs: object) -> str | Malformed:
    """The job id a step message carries (as `args=[job_id]`), or why it carries none.

    Args:
        args: the message's positional arguments.
        kwargs: its keyword arguments.

    Returns:
        The job id, in the canonical form of a UUID; or `Malformed`.
    """
    if isinstance(kwargs, Mapping) and kwargs:
        names = _shown(sorted(str(name) for name in kwargs))
        return Malformed(
            MalformedReason.ARGUMENTS,
            f"keyword arguments {names}: a step message takes one argument, the job id",
        )
    if not isinstance(args, Sequence) or isinstance(args, str) or len(args) != 1:
        given = len(args) if isinstance(args, Sequence) else type(args).__name__
        return Malformed(
            MalformedReason.ARGUMENTS,
            f"arguments {_shown(args)} ({given}): a step message takes one, the job id",
        )
    [job_id] = args
    try:
        return str(UUID(job_id))
    except (TypeError, ValueError, AttributeError):
        return Malformed(MalformedReason.JOB_ID, f"job id {_shown(job_id)} is not a UUID")


def reject_malformed(rt: Runtime | None, task: str, message_id: str, malformed: Malformed) -> None:
    """Say and count that a step message is rejected as malformed (the caller rejects it,
    without requeueing: it would come back forever; `oncelery_malformed_messages_total`).
    `rt`: where to count it; None when no runtime can be had."""
    logger.error(
        "rejected step message %s of %s: %s",
        message_id,
        task,
        malformed.detail,
        extra={"action": "malformed_message", "task": task, "reason": str(malformed.reason)},
    )
    _count(rt, task, malformed)


def no_such_job(rt: Runtime, pipeline: str, step: str, job_id: str) -> None:
    """Say and count that a step message's well-formed job id names no job (the caller
    acknowledges the message: nothing is wrong with its form)."""
    task = task_name(pipeline, step)
    logger.warning(
        "step message of %s names no job: %s",
        task,
        job_id,
        extra={"action": "no_such_job", "task": task, "job_id": job_id, "step": step},
    )
    _count(rt, task, Malformed(MalformedReason.NO_SUCH_JOB, f"no job {job_id}"))


def _count(rt: Runtime | None, task: str, malformed: Malformed) -> None:
    # Counting is a courtesy: a database that cannot count must not keep the message.
    if rt is None:
        return
    try:
        MalformedMessages(engine=rt.engine).count(task, str(malformed.reason), malformed.detail)
    except Exception:  # whatever went wrong, the message is still ended once
        logger.warning(
            "malformed message of %s not counted",
            task,
            exc_info=True,
            extra={"action": "malformed_not_counted", "task": task},
        )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."
