"""Waiting for a job's end (`jobs.wait`, `oncelery history --wait`): on Postgres a waited-for
job's end is announced (the `awaited` flag, migration 0005's trigger); on SQLite its state is
polled. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import time
from typing import Final
from uuid import UUID

from ledger import db, queries
from ledger.errors import JobNotFound
from ledger.notices import JOB_ENDED_CHANNEL, Listener
from ledger.store import JobStore
from ledger.types import FINISHED_JOB_STATES, Job, JobState

#: Seconds between two looks at a waited-for job's state while no notice comes: a safety
#: net, since its end is announced.
_RECHECK: Final = 10.0
#: SQLite, which cannot announce: the first and the longest pause of the poll, in seconds.
_FIRST_PAUSE: Final = 0.05
_LONGEST_PAUSE: Final = 1.0


def wait_for_end(store: JobStore, job_id: UUID, timeout: float) -> Job | None:
    """The job once it has ended (succeeded, dead-lettered or cancelled), or None if it had
    not after `timeout` seconds. Never a busy loop: on Postgres it sleeps until the end is
    announced; on SQLite it polls at growing intervals, up to a second.

    Raises:
        JobNotFound: no job has that id.
        DatabaseUnavailable: the database, or the connection listening to it, failed.
    """
    deadline = time.monotonic() + timeout
    if db.is_postgres(store.engine):
        return _heard(store, job_id, deadline)
    return _polled(store, job_id, deadline)


def mark_awaited(store: JobStore, job_id: UUID) -> JobState:
    """Note that someone waits for the job's end (on Postgres its end is then announced on
    `JOB_ENDED_CHANNEL`); its state now. `updated_at` is left alone: waiting is no progress.

    Raises:
        JobNotFound: no job has that id.
    """
    with db.single_statement(store.engine) as conn:
        row = conn.execute(queries.mark_awaited(job_id)).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return JobState(row.state)


def _heard(store: JobStore, job_id: UUID, deadline: float) -> Job | None:
    # Listening before the job is marked awaited: an end between the two is still heard, and
    # an end before the mark is seen in the state the mark returns.
    listener = Listener(store.engine, [JOB_ENDED_CHANNEL])
    try:
        state = mark_awaited(store, job_id)
        while state not in FINISHED_JOB_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            heard = listener.wait(min(left, _RECHECK))
            if str(job_id) in heard or not heard:
                state = store.get_job(job_id).state
    finally:
        listener.close()
    return store.get_job(job_id)


def _polled(store: JobStore, job_id: UUID, deadline: float) -> Job | None:
    pause = _FIRST_PAUSE
    while (job := store.get_job(job_id)).state not in FINISHED_JOB_STATES:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, _LONGEST_PAUSE)
    return job
