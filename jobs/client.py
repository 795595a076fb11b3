"""`enqueue`, `wait` and `signal`: start a job of any declared pipeline from any Python process
(a web view, a script, a step), alone or inside the caller's own database transaction, wait
for its end, and signal the jobs that wait. What they need is built from the settings on
first use, once per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy.engine import Connection

from config import Settings, get_settings
from jobs.engine.dispatch import Dispatch
from jobs.engine.enqueue import start_jobs
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.engine.signals import send_signal
from jobs.events import payload_event
from jobs.ops.history import history_view
from jobs.pipelines import Pipeline, registry
from jobs.signals import new_signal
from ledger import JSON, SignalOutcome, wait_for_end

R = TypeVar("R")


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
    and when the caller commits. On Postgres the commit announces it and beat's relay sends
    it moments later; any job a listening relay missed (and every job on SQLite) is sent by
    a relay round within `ONCELERY_RELAY_AFTER` seconds (beat, `oncelery api` and each sweep
    run one). A process that dies between its commit and any publish loses nothing.

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
    history --json` prints it: `state`, `results` (what each step returned, by name) and
    `steps` (each with its attempts, input, output and error).

    On Postgres the job's end is announced (LISTEN/NOTIFY), heard on one connection that
    every wait of the process shares while any waits; on SQLite its state is polled, at
    growing intervals up to a second.

    Raises:
        TimeoutError: the job had not ended after `timeout` seconds.
        JobNotFound: no job has that id.
        ValueError: `job_id` is not a job id.
    """
    job = job_id if isinstance(job_id, UUID) else UUID(job_id)
    store = _runtime().store
    if wait_for_end(store, job, timeout) is None:
        raise TimeoutError(f"job {job} did not end within {timeout:g} s")
    return history_view(store.history(job))


def signal(name: str, key: str, *, signal_id: str, data: JSON = None) -> SignalOutcome:
    """Send a signal: to the oldest job waiting for `name` with `key` (a `WaitForSignal`
    step), which moves on at once with the signal's id and data as the wait's result — or,
    if none waits, kept for the first wait of that name and key to come.

    Idempotent by `signal_id`: the same id again (same key and data) changes nothing. Whether
    the wait's timeout fired first or the signal came first, one compare-and-set decides,
    and the loser changes nothing (a signal that came too late stays kept).

    Returns:
        `SignalOutcome.RECORDED` (`"recorded"`) or `SignalOutcome.DUPLICATE`.

    Raises:
        InvalidSignal: the name, key, id or data is not valid (the message names which).
        SignalConflict: the id was sent before with another key or other data (nothing is
            written).
        UnknownPipeline: the job waiting for it is of a pipeline this process does not
            declare (add its module to `ONCELERY_PIPELINES`).
    """
    found = new_signal(name, key, signal_id, data)
    state = _state()
    load_pipelines(state.settings)
    return send_signal(state.runtime, state.dispatch(), found).outcome


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
