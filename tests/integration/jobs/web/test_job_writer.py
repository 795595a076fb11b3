"""`JobWriter` on real Postgres: concurrent requests share writes (fewer statements than jobs),
the same event twice is one job, and a job Postgres refuses fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
import sqlalchemy as sa

from jobs.web.job_writer import JobWriter
from ledger import JobStore, NewJob, StatementRejected
from tests.factories import new_job

T = TypeVar("T")

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


async def in_thread(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


def create_all(writer: JobWriter, jobs: list[NewJob]) -> list[object]:
    async def run() -> list[object]:
        return await asyncio.gather(*(writer.create(job) for job in jobs), return_exceptions=True)

    return asyncio.run(run())


def inserts(statements: list[str]) -> int:
    return sum(1 for s in statements if s.lstrip().upper().startswith("INSERT INTO JOBS"))


def test_concurrent_jobs_are_written_in_fewer_statements_than_jobs(
    engine: sa.Engine, statements: list[str]
) -> None:
    writer = JobWriter(JobStore(engine=engine), in_thread, writes=2)
    jobs = [new_job() for _ in range(60)]

    outcomes = create_all(writer, jobs)

    assert all(isinstance(o, tuple) and o[1] for o in outcomes), outcomes
    assert len({o[0] for o in outcomes if isinstance(o, tuple)}) == 60
    assert inserts(statements) < 60


def test_the_same_event_twice_at_once_is_one_job(engine: sa.Engine) -> None:
    writer = JobWriter(JobStore(engine=engine), in_thread, writes=1)
    job = new_job(event_id="evt-twice")

    first, second = create_all(writer, [job, job])

    assert isinstance(first, tuple)
    assert isinstance(second, tuple)
    assert first[0] == second[0]
    assert sorted([first[1], second[1]]) == [False, True]


def test_a_refused_job_fails_alone(engine: sa.Engine) -> None:
    writer = JobWriter(JobStore(engine=engine), in_thread, writes=1)
    # Postgres' jsonb refuses the NUL character: the whole multi-row INSERT would fail.
    refused = new_job(context={"note": "\u0000"})
    jobs = [new_job(), refused, new_job()]

    outcomes = create_all(writer, jobs)

    assert isinstance(outcomes[1], StatementRejected)
    assert all(isinstance(o, tuple) and o[1] for o in (outcomes[0], outcomes[2])), outcomes
