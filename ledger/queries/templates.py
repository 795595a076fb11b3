"""The hot path's statements, built once per shape and run with named parameters (see
`common.param`): building SQLAlchemy constructs costs more CPU than running them."""

from __future__ import annotations

import functools
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from ledger.queries.protocol import (
    claim_step_in_one,
    finish_entry,
    record_and_claim_next_in_one,
    record_step_in_one,
    renew_lease,
)
from ledger.types import JSON, EventKind, JobState, StepState

#: A placeholder for the parameters a template is built with (each run passes real ones).
_ANY = UUID(int=0)


@functools.cache
def claim_template(takeover_expired: bool) -> sa.Select[Any]:
    """`claim_step_in_one`, built once; run it with `claim_params`."""
    return claim_step_in_one(
        _ANY, step="", owner=_ANY, lease_seconds=0.0, takeover_expired=takeover_expired
    )


def claim_params(job_id: UUID, step: str, owner: UUID, lease_seconds: float) -> dict[str, Any]:
    """The parameters of `claim_template`."""
    return {
        "p_job_id": job_id,
        "p_step": step,
        "p_step_key": step,
        "p_owner": owner,
        "p_lease": lease_seconds,
    }


@functools.cache
def record_success_template(last: bool) -> sa.Select[Any]:
    """`record_step_in_one` for a success (of the last step, or not), built once; run it with
    `record_params`."""
    finished = finish_entry("", _ANY, state=StepState.SUCCEEDED, result={}, error=None)
    state = JobState.SUCCEEDED if last else JobState.RUNNING
    return record_step_in_one(
        finished, (_ANY, EventKind.SUCCEEDED, 0.0, {}), (state, None if last else "", ("", {}))
    )


@functools.cache
def record_retry_template() -> sa.Select[Any]:
    """`record_step_in_one` for a failed attempt to be retried, built once; run it with
    `record_params`."""
    finished = finish_entry("", _ANY, state=StepState.FAILED, result=None, error={})
    return record_step_in_one(
        finished, (_ANY, EventKind.FAILED, 0.0, {}), (JobState.RUNNING, "", None)
    )


@functools.cache
def record_and_claim_template(takeover_expired: bool) -> sa.Select[Any]:
    """`record_and_claim_next_in_one`, built once; run it with `record_params` and
    `claim_params` merged."""
    finished = finish_entry("", _ANY, state=StepState.SUCCEEDED, result={}, error=None)
    return record_and_claim_next_in_one(
        finished,
        (_ANY, EventKind.SUCCEEDED, 0.0, {}),
        ("", {}),
        next_step="",
        owner=_ANY,
        lease_seconds=0.0,
        takeover_expired=takeover_expired,
    )


@functools.cache
def renew_lease_template() -> sa.Update:
    """`renew_lease`, built once; run it with `renew_params`."""
    return renew_lease("", _ANY, 0.0)


def renew_params(key: str, owner: UUID, lease_seconds: float) -> dict[str, Any]:
    """The parameters of `renew_lease_template`."""
    return {"p_record_key": key, "p_record_owner": owner, "p_lease": lease_seconds}


def record_params(
    *,
    key: str,
    owner: UUID,
    job_id: UUID,
    event: tuple[float | None, JSON],
    job: tuple[JobState, str | None],
    result: tuple[str, JSON] | None = None,
    error: JSON = None,
) -> dict[str, Any]:
    """The parameters of the record templates: the key and its owner, the event's duration
    and detail, the job's new state and step, the step's result or error."""
    duration_ms, detail = event
    state, current_step = job
    values: dict[str, Any] = {
        "p_record_key": key,
        "p_record_owner": owner,
        "p_job_id": job_id,
        "p_duration_ms": duration_ms,
        "p_detail": detail,
        "p_job_state": str(state),
        "p_current_step": current_step,
    }
    if result is not None:
        values["p_result_step"], values["p_result"] = result
    if error is not None:
        values["p_error"] = error
    return values
