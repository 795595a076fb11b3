"""The shapes of the API's answers, for its OpenAPI schema (`jobs.web.api_schema`): the
handlers answer plain JSON, these only describe it."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel


class Accepted(BaseModel):
    """The webhook's answer: the event's job."""

    job_id: UUID


class Health(BaseModel):
    """`/healthz`: each dependency's state (503 when one is not `ok`)."""

    database: Literal["ok", "unavailable"]
    broker: str


class JobSummary(BaseModel):
    """One job of `GET /jobs`."""

    job_id: UUID
    pipeline: str
    event_id: str
    order_id: Any
    state: str
    current_step: str | None
    created_at: str
    finished_at: str | None


class JobList(BaseModel):
    """`GET /jobs`: the most recently created first."""

    jobs: list[JobSummary]


class LetterList(BaseModel):
    """`GET /dead-letters`: as `oncelery dlq list --json` prints them."""

    dead_letters: list[dict[str, Any]]


class DryRun(BaseModel):
    """A replay's plan (`dry_run=true`), or what the replay did."""

    dry_run: bool | None = None
    plan: dict[str, Any] | None = None
    dead_letter: int | None = None
    job_id: str | None = None
    done: bool | None = None
    detail: str | None = None


class Woken(BaseModel):
    """The job a signal moved on, and the wait step it was at."""

    job_id: UUID
    step: str


class SignalAnswer(BaseModel):
    """`POST /signals/{name}`'s answer."""

    outcome: Literal["recorded", "duplicate"]
    signal_id: str
    woke: Woken | None
