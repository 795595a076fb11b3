"""`JobWriter`: the webhook's jobs written in groups (a group commit): idle, a job is written at
once, alone; under load one commit serves many requests instead of each waiting for its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar
from uuid import UUID

from jobs.errors import JobError
from ledger import DatabaseUnavailable, JobStore, LedgerError, NewJob

T = TypeVar("T")

#: The most jobs one write takes: one INSERT of a hundred rows is still a few milliseconds.
MAX_GROUP: Final = 100

#: What `create_jobs` answers for one job: its id and whether it was created now.
Created = tuple[UUID, bool]


class JobWriter:
    """Writes jobs in groups, at most `writes` groups at a time. Each request's job joins the
    next write; a few writes run at once on the intake's database threads, each taking every
    job waiting when it starts, in one statement and one commit.

    A job is still created exactly as `JobStore.create_jobs` creates a list of them: each its
    own row, the same event id twice in one write one job (the first created, the second
    found).

    Args:
        store: where jobs are created.
        run: runs a blocking call off the event loop and awaits it (the intake's database
            threads, with their deadline); what it raises is raised to each request of the
            group.
        writes: groups written at once.
    """

    def __init__(
        self,
        store: JobStore,
        run: Callable[
            [Callable[[], list[Created | Exception]]], Awaitable[list[Created | Exception]]
        ],
        *,
        writes: int,
    ) -> None:
        self.store = store
        self.run = run
        self.writes = writes
        self._waiting: list[tuple[NewJob, asyncio.Future[Created]]] = []
        self._writing: set[asyncio.Task[None]] = set()

    async def create(self, job: NewJob) -> Created:
        """Create the job (or find the one its event already has) in the next write.

        Raises:
            Whatever creating it raised, or `run` raised for its group.
        """
        future: asyncio.Future[Created] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        self._start_writes()
        return await future

    def _start_writes(self) -> None:
        while self._waiting and len(self._writing) < self.writes:
            group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
            task = asyncio.create_task(self._write(group))
            self._writing.add(task)
            task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        self._start_writes()

    async def _write(self, group: list[tuple[NewJob, asyncio.Future[Created]]]) -> None:
        jobs = [job for job, _ in group]
        try:
            outcomes = await self.run(lambda: self._create(jobs))
        except Exception as exc:  # noqa: BLE001 - handed to every request of the group
            outcomes = [exc] * len(group)
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():  # its client went away
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _create(self, jobs: Sequence[NewJob]) -> list[Created | Exception]:
        """Each job's outcome: created or found, or why not (blocking)."""
        try:
            return list(self.store.create_jobs(jobs))
        except DatabaseUnavailable:
            raise
        except (LedgerError, JobError) as exc:
            if len(jobs) == 1:
                return [exc]
        # One job refused (its event conflicts, its values are rejected) must not be the
        # others' answer: each is written alone, as if it had come alone.
        return [self._create_alone(job) for job in jobs]

    def _create_alone(self, job: NewJob) -> Created | Exception:
        try:
            [outcome] = self.store.create_jobs([job])
        except DatabaseUnavailable:
            raise
        except (LedgerError, JobError) as exc:
            return exc
        return outcome
