"""Creating jobs (`JobStore.create_jobs`): one per event, deduplicated by event id, all or
nothing when an event id comes back with other content. Must not import celery, kombu, jobs
or config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy.engine import Connection, Engine

from ledger import db, queries
from ledger.direct import for_engine
from ledger.errors import EventConflict
from ledger.notices import OUTBOX_CHANNEL
from ledger.types import NewJob

#: Rows per INSERT when creating many jobs at once.
INSERT_BATCH = 500
#: Job ids per outbox announcement.
_ANNOUNCED = 200

#: A job's id and whether this call created it: True, False (the same event was there), or
#: None (the event id was there with other content: a conflict).
_Created = tuple[UUID, bool | None]


def create_jobs(
    engine: Engine, new_jobs: Sequence[NewJob], *, dispatched: bool
) -> list[tuple[UUID, bool]]:
    """For each new job in order, its id and whether it was created now (see
    `JobStore.create_jobs`).

    Raises:
        EventConflict: an event id came with other content than it had before.
    """
    first_of = _first_occurrences(new_jobs)
    unique = [new_jobs[index] for index in first_of.values()]
    if len(unique) == 1 and db.is_postgres(engine):
        # Its INSERT wrote nothing if the event was there: a conflict leaves no trace.
        ids = _create_one(engine, unique[0], dispatched=dispatched)
        _raise_conflict(ids, unique, first_of)
    else:
        ids = {}
        with db.transaction(engine) as conn:
            for start in range(0, len(unique), INSERT_BATCH):
                batch = unique[start : start + INSERT_BATCH]
                ids.update(_create_batch(conn, batch, dispatched=dispatched))
            # Raised inside the transaction: its rollback takes every row of the input.
            _raise_conflict(ids, unique, first_of)
    return _answer(new_jobs, ids)


def _answer(
    new_jobs: Sequence[NewJob], ids: dict[tuple[str, str], _Created]
) -> list[tuple[UUID, bool]]:
    """Each new job's id, and whether it was created now (only its event's first occurrence
    can have been)."""
    seen: set[tuple[str, str]] = set()
    answer = []
    for job in new_jobs:
        identity = _identity(job)
        job_id, created = ids[identity]
        answer.append((job_id, bool(created) and identity not in seen))
        seen.add(identity)
    return answer


def create_jobs_in(conn: Connection, new_jobs: Sequence[NewJob]) -> list[tuple[UUID, bool]]:
    """`create_jobs` in the caller's transaction (see `JobStore.create_jobs_in`), left in
    the outbox and, on Postgres, announced on the outbox channel at commit.

    Raises:
        EventConflict: an event id came with other content than it had before.
    """
    first_of = _first_occurrences(new_jobs)
    unique = [new_jobs[index] for index in first_of.values()]
    # One job's INSERT writes nothing when its event conflicts; several need a savepoint,
    # so that a conflict takes back this call's rows and leaves the caller's.
    nested = conn.begin_nested() if len(unique) > 1 else None
    ids: dict[tuple[str, str], _Created] = {}
    try:
        for start in range(0, len(unique), INSERT_BATCH):
            batch = unique[start : start + INSERT_BATCH]
            ids.update(_create_batch(conn, batch, dispatched=False))
        _raise_conflict(ids, unique, first_of)
    except BaseException:
        if nested is not None:
            nested.rollback()
        raise
    if nested is not None:
        nested.commit()
    created = [str(job_id) for job_id, is_new in ids.values() if is_new]
    if created and conn.dialect.name == "postgresql":
        # A NOTIFY payload holds under 8,000 bytes: 200 ids of 37 characters fit.
        for start in range(0, len(created), _ANNOUNCED):
            payload = ",".join(created[start : start + _ANNOUNCED])
            conn.execute(queries.announce(OUTBOX_CHANNEL, payload))
    return _answer(new_jobs, ids)


def _create_one(
    engine: Engine, job: NewJob, *, dispatched: bool
) -> dict[tuple[str, str], _Created]:
    """One job on Postgres, as an intake creates them: the INSERT on the direct
    connection (a third of the client's time on the engine, see `ledger.direct`)."""
    insert = queries.insert_jobs(engine.dialect.name, dispatched)
    inserted = for_engine(engine).one(insert, _job_row(job))
    if inserted is not None:
        return {_identity(job): (inserted["id"], True)}
    with db.single_statement(engine) as conn:
        return _existing(conn, [job])


def _create_batch(
    conn: Connection, batch: Sequence[NewJob], *, dispatched: bool
) -> dict[tuple[str, str], _Created]:
    """Inside the caller's transaction: insert the jobs of events not seen before; the
    others' existing ids (None for `created` when the content differs)."""
    if not batch:
        return {}
    insert = queries.insert_jobs(conn.dialect.name, dispatched)
    found: dict[tuple[str, str], _Created] = {
        (row.pipeline, row.event_id): (row.id, True)
        for row in conn.execute(insert, [_job_row(job) for job in batch])
    }
    found.update(_existing(conn, [job for job in batch if _identity(job) not in found]))
    return found


def _identity(job: NewJob) -> tuple[str, str]:
    return (job.pipeline, job.event_id)


def _first_occurrences(new_jobs: Sequence[NewJob]) -> dict[tuple[str, str], int]:
    """Each event's first place in `new_jobs`.

    Raises:
        EventConflict: an event id appears again with other content.
    """
    first_of: dict[tuple[str, str], int] = {}
    for index, job in enumerate(new_jobs):
        first = first_of.setdefault(_identity(job), index)
        if new_jobs[first].fingerprint != job.fingerprint:
            raise EventConflict(job.pipeline, job.event_id, index)
    return first_of


def _raise_conflict(
    ids: dict[tuple[str, str], _Created],
    unique: Sequence[NewJob],
    first_of: dict[tuple[str, str], int],
) -> None:
    conflict = next((job for job in unique if ids[_identity(job)][1] is None), None)
    if conflict is not None:
        index = first_of[_identity(conflict)]
        raise EventConflict(conflict.pipeline, conflict.event_id, index)


def _existing(conn: Connection, jobs: Sequence[NewJob]) -> dict[tuple[str, str], _Created]:
    """The jobs already created for these events, each marked a conflict when its content
    (its fingerprint) differs."""
    found: dict[tuple[str, str], _Created] = {}
    by_pipeline: dict[str, dict[str, NewJob]] = {}
    for job in jobs:
        by_pipeline.setdefault(job.pipeline, {})[job.event_id] = job
    for pipeline, wanted in by_pipeline.items():
        for row in conn.execute(queries.select_job_ids(pipeline, list(wanted))):
            same = row.fingerprint == wanted[row.event_id].fingerprint
            found[(pipeline, row.event_id)] = (row.id, False if same else None)
    return found


def _job_row(job: NewJob) -> dict[str, Any]:
    """A new job's own values, for `queries.insert_jobs`."""
    return {
        "id": uuid4(),
        "pipeline": job.pipeline,
        "event_id": job.event_id,
        "context": dict(job.context),
        "fingerprint": job.fingerprint,
        "step_keys": dict(job.step_keys),
        "current_step": job.first_step,
    }
