"""Postgres notices: the channels the ledger announces on (a job sent to the outbox by a
caller's transaction, a waited-for job's end) and `Listener`, which hears them on a
connection of its own. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

import psycopg
from sqlalchemy.engine import Engine

from ledger.errors import DatabaseUnavailable

#: Jobs a caller's transaction left in the outbox (`JobStore.create_jobs_in`): their ids,
#: comma-separated, heard when that transaction commits and never if it rolls back.
OUTBOX_CHANNEL: Final = "oncelery_outbox"
#: The id of a job that ended while someone waited for it (`ledger.job_ends`), announced
#: by the trigger of migration 0005.
JOB_ENDED_CHANNEL: Final = "oncelery_job_ended"


class Listener:
    """LISTENs on channels, on an autocommit connection of its own (a pooled connection
    would hand its notices to whoever borrows it next).

    Args:
        engine: a Postgres engine (its URL and connect arguments are used).
        channels: what to listen to.

    Raises:
        DatabaseUnavailable: the connection or the LISTEN failed.
    """

    def __init__(self, engine: Engine, channels: Iterable[str]) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        try:
            self._connection = psycopg.connect(*args, **kwargs, autocommit=True)
            for channel in channels:
                self._connection.execute(f"LISTEN {channel}")
        except psycopg.Error as exc:
            raise DatabaseUnavailable(str(exc).strip().splitlines()[0]) from exc

    def wait(self, timeout: float) -> list[str]:
        """The payloads heard within `timeout` seconds: once one arrives, it and any others
        already there (an empty list when none came).

        Raises:
            DatabaseUnavailable: the connection broke (notices sent meanwhile are lost).
        """
        heard: list[str] = []
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            for notice in self._connection.notifies(timeout=max(timeout, 0.0), stop_after=1):
                heard.append(notice.payload)
            while heard and time.monotonic() < deadline:
                more = [n.payload for n in self._connection.notifies(timeout=0.0, stop_after=100)]
                if not more:
                    break
                heard.extend(more)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(str(exc).strip().splitlines()[0]) from exc
        return heard

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()
