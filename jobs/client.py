"""`enqueue` and `wait`: start a job of any declared pipeline from any Python process (a web
view, a script, a step), alone or inside the caller's own database transaction, and wait for
its end. What they need is built from the settings on first use, once per process."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Final, TypeVar
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy.engine import Connection

from config import Settings, get_settings
from jobs.engine.dispatch import Dispatch
from jobs.engine.enqueue import start_jobs
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.events import payload_event
from jobs.ops.history import history_view
from jobs.pipelines import Pipeline, registry
from ledger import FINISHED_JOB_STATES, JOB_ENDED_CHANNEL, JSON, JobStore, Listener

R = TypeVar("R")

#: Seconds between two looks at a waited-for job's state while no notice comes (a safety
#: net: on Postgres its end is announced).
_RECHECK: Final = 10.0
#: SQLite, which cannot announce: the first and the longest pause of the poll, in seconds.
_FIRST_PAUSE: Final = 0.05
_LONGEST_PAUSE: Final = 1.0


def enqueue(
    pipeline: Pipeline[R] | str,
    payload: Mapping[str, object] | BaseModel,
    *,
    event_id: str,
    connection: Connection | None = None,
) -> str:
    """Start a job of a pipeline for one event, or find the one its event already started.

    Without `connection`, the job is written and its first step published right away (if the
    broker refuses, the job waits in the outbox and the relay sends it). With `connection`,
    the job is written in the caller's transaction and nothing is published now: it exists if
    and when the caller commits, and the relay (beat, or any `oncelery api`) sends it then —
    moments after the commit on Postgres, which announces it; a process that dies between its
    commit and any publish loses nothing.

    Args:
        pipeline: a declared pipeline, or its name (modules in `ONCELERY_PIPELINES` are
            loaded to find it).
        payload: the job's input: a mapping of the pipeline's input fields, or an instance of
            its input model. Validated strictly; `event_id` is not part of it.
        event_id: what makes two calls the same event: the same id with the same payload
            gives the same job id; with another payload, a conflict.
        connection: a SQLAlchemy connection in an open transaction on the ledger's database.

    Returns:
        The job's id.

    Raises:
        UnknownPipeline: no pipeline has that name.
        InvalidEvent: the payload or event id is not valid (the message names the field).
        EventConflict: the event id came before with another payload.
        ValueError: `connection` is not in a transaction.
    """
    found = _pipeline(pipeline)
    job = payload_event(found, payload, event_id=event_id).new_job(found)
    rt = _runtime()
    if connection is not None:
        if not connection.in_transaction():
            # Autobegun later and never committed, the job would silently vanish.
            raise ValueError("connection must be in an open transaction (connection.begin())")
        [(job_id, _)] = rt.store.create_jobs_in(connection, [job])
        return str(job_id)
    [started] = start_jobs(rt.store, _state().dispatch(), found, [job])
    return started.job_id


def wait(job_id: str | UUID, timeout: float) -> dict[str, JSON]:
    """Wait for a job to end (succeeded, dead-lettered or cancelled); its view, as `oncelery
    history --json` prints it: `state`, and `steps`, each with its `output` (the result).

    On Postgres the job's end is announced (LISTEN/NOTIFY); on SQLite its state is polled,
    at growing intervals up to a second.

    Raises:
        TimeoutError: the job had not ended after `timeout` seconds.
        JobNotFound: no job has that id.
        ValueError: `job_id` is not a job id.
    """
    job = job_id if isinstance(job_id, UUID) else UUID(job_id)
    store = _runtime().store
    deadline = time.monotonic() + timeout
    if store.engine.dialect.name == "postgresql":
        ended = _await_notice(store, job, deadline)
    else:
        ended = _await_poll(store, job, deadline)
    if not ended:
        raise TimeoutError(f"job {job} did not end within {timeout:g} s")
    return history_view(store.history(job))


def _await_notice(store: JobStore, job: UUID, deadline: float) -> bool:
    """Whether the job ended by `deadline`, heard from its end's announcement."""
    # Listening before marking the job awaited: an end between the two is still heard.
    listener = Listener(store.engine, [JOB_ENDED_CHANNEL])
    try:
        state = store.await_job(job)
        while state not in FINISHED_JOB_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            heard = listener.wait(min(left, _RECHECK))
            if str(job) in heard or not heard:
                state = store.get_job(job).state
    finally:
        listener.close()
    return True


def _await_poll(store: JobStore, job: UUID, deadline: float) -> bool:
    """Whether the job ended by `deadline`, polled at growing intervals."""
    pause = _FIRST_PAUSE
    while store.get_job(job).state not in FINISHED_JOB_STATES:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, _LONGEST_PAUSE)
    return True


def _pipeline(pipeline: Pipeline[R] | str) -> Pipeline[object]:
    if isinstance(pipeline, Pipeline):
        return pipeline  # type: ignore[return-value]
    if pipeline not in registry:
        load_pipelines(get_settings())
    return registry.get(pipeline)


class _Client:
    """What `enqueue` and `wait` use in this process, built from the settings on first use:
    a runtime of their own (its engine), and a Celery app that only sends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.runtime = Runtime.from_settings(settings)
        self._dispatch: Dispatch | None = None

    def dispatch(self) -> Dispatch:
        """The publishing side, built when a job is first sent (it imports Celery)."""
        if self._dispatch is None:
            from jobs.worker import CeleryDispatch, client_app  # noqa: PLC0415

            sender = client_app(self.settings)
            self._dispatch = CeleryDispatch(sender=sender, settings=self.settings)
        return self._dispatch


_client: _Client | None = None
_client_lock = threading.Lock()


def _state() -> _Client:
    """This process's client: built again after a fork (no connection crosses one), and when
    the settings were read again (tests do)."""
    global _client  # noqa: PLW0603 - one client per process, by design
    settings = get_settings()
    with _client_lock:
        if _client is None or _client.pid != os.getpid() or _client.settings is not settings:
            if _client is not None and _client.pid == os.getpid():
                _client.runtime.close()
            _client = _Client(settings)
        return _client


def _runtime() -> Runtime:
    return _state().runtime
