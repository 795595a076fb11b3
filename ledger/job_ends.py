"""Waiting for a job's end (`jobs.wait`, `oncelery history --wait`): on Postgres a waited-for
job's end is announced (the `awaited` flag, migration 0005's trigger); on SQLite its state is
polled. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import os
import threading
import time
from typing import Final
from uuid import UUID

from sqlalchemy.engine import Engine

from ledger import db, queries
from ledger.errors import DatabaseUnavailable, JobNotFound
from ledger.notices import JOB_ENDED_CHANNEL, Listener
from ledger.store import JobStore
from ledger.types import FINISHED_JOB_STATES, Job, JobState

#: Seconds between two looks at a waited-for job's state while no notice comes: a safety
#: net, since its end is announced.
_RECHECK: Final = 10.0
#: Seconds the listening thread waits for a notice before it checks whether anyone still waits.
_IDLE_CHECK: Final = 1.0
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
    watch = _watch_for(store)
    # Heard before the job is marked awaited: an end between the two is still heard, and an
    # end before the mark is seen in the state the mark returns.
    ended = watch.register(str(job_id))
    try:
        state = mark_awaited(store, job_id)
        while state not in FINISHED_JOB_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ended.wait(min(left, _RECHECK))
            ended.clear()
            state = store.get_job(job_id).state
    finally:
        watch.unregister(str(job_id), ended)
    return store.get_job(job_id)


class _EndWatch:
    """Every wait of one process on one database shares one LISTEN connection, held by a
    thread while anyone waits: a hundred waiting request handlers are one connection, not a
    hundred (Postgres allows a hundred in all by default)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._failure: DatabaseUnavailable | None = None

    def register(self, job_id: str) -> threading.Event:
        """An event set when `job_id`'s end is heard (or when notices may have been missed),
        once the connection listens.

        Raises:
            DatabaseUnavailable: the connection could not be opened.
        """
        ended = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(ended)
            if self._thread is None:
                self._listening.clear()
                self._failure = None
                self._thread = threading.Thread(
                    target=self._listen, name="oncelery-job-ends", daemon=True
                )
                self._thread.start()
        self._listening.wait()
        if self._failure is not None:
            self.unregister(job_id, ended)
            raise self._failure
        return ended

    def unregister(self, job_id: str, ended: threading.Event) -> None:
        with self._lock:
            waiting = self._waiters.get(job_id, set())
            waiting.discard(ended)
            if not waiting:
                self._waiters.pop(job_id, None)

    def _listen(self) -> None:
        try:
            listener = Listener(self._engine, [JOB_ENDED_CHANNEL])
        except DatabaseUnavailable as exc:
            with self._lock:
                self._failure, self._thread = exc, None
            self._listening.set()
            return
        self._listening.set()
        try:
            while True:
                with self._lock:
                    if not self._waiters:
                        # Under the lock: a wait registering now starts a new thread.
                        self._thread = None
                        return
                try:
                    heard = set(listener.wait(_IDLE_CHECK))
                except DatabaseUnavailable:
                    # Notices sent meanwhile are lost: every waiter looks again, then the
                    # next wait opens a new connection.
                    with self._lock:
                        self._thread = None
                        for waiting in self._waiters.values():
                            for ended in waiting:
                                ended.set()
                    return
                with self._lock:
                    for job_id in heard & self._waiters.keys():
                        for ended in self._waiters[job_id]:
                            ended.set()
        finally:
            listener.close()


_watches: dict[tuple[int, str], _EndWatch] = {}
_watches_lock = threading.Lock()


def _watch_for(store: JobStore) -> _EndWatch:
    # By process: a forked child has none of its parent's threads.
    key = (os.getpid(), store.engine.url.render_as_string(hide_password=False))
    with _watches_lock:
        if key not in _watches:
            _watches[key] = _EndWatch(store.engine)
        return _watches[key]


def _polled(store: JobStore, job_id: UUID, deadline: float) -> Job | None:
    pause = _FIRST_PAUSE
    while (job := store.get_job(job_id)).state not in FINISHED_JOB_STATES:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, _LONGEST_PAUSE)
    return job
