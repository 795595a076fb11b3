"""`JobStore`: jobs and their history, created (`new_jobs`), read, cancelled, taken by the
sweeper and the outbox relay, and pruned. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from sqlalchemy import Update
from sqlalchemy.engine import Connection, Engine, RowMapping

from ledger import db, queries
from ledger.errors import JobNotFound
from ledger.map_counters import counters_of
from ledger.new_jobs import create_jobs, create_jobs_in
from ledger.types import (
    JSON,
    EventKind,
    Job,
    JobHistory,
    JobState,
    NewJob,
    StepEntry,
    StepEvent,
    StepState,
)

#: Keys per IN list when reading many.
_READ_BATCH = 500


@dataclass(frozen=True)
class JobToSend:
    """A job the sweeper took: send `step` of it again."""

    job_id: UUID
    pipeline: str
    step: str | None
    state: JobState


@dataclass(frozen=True)
class UnfinishedStep:
    """An unfinished job and its current step's entry (None while the step is unclaimed)."""

    job_id: UUID
    key: str | None
    state: StepState | None
    attempts: int | None
    locked_until: datetime | None


class JobStore:
    """Jobs and their history, over one engine.

    Args:
        engine: where the ledger lives (one engine per process).
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine

    def create_jobs(
        self, new_jobs: Sequence[NewJob], *, dispatched: bool = False
    ) -> list[tuple[UUID, bool]]:
        """Create jobs, one per event; an event seen before keeps its first job. All or
        nothing: when one event conflicts, no job of `new_jobs` is created.

        Args:
            new_jobs: the jobs' plans.
            dispatched: whether the caller sends each new job's first step right away (then
                it calls `undo_dispatched` for a send that fails; if it dies before sending,
                the sweeper finds the job). False leaves the jobs in the outbox for a relay.

        Returns:
            For each new job in order, its id and whether it was created now (False when the
            event id, or an earlier one in the same batch, already had a job).

        Raises:
            EventConflict: an event id came with other content than it had before (in an
                earlier call, or earlier in `new_jobs`).
        """
        return create_jobs(self.engine, new_jobs, dispatched=dispatched)

    def create_jobs_in(
        self, conn: Connection, new_jobs: Sequence[NewJob]
    ) -> list[tuple[UUID, bool]]:
        """`create_jobs` inside the caller's open transaction, which this never commits: the
        jobs exist if and when it commits. They wait in the outbox; on Postgres they are
        announced on `notices.OUTBOX_CHANNEL`, heard by a relay at the commit.

        Raises:
            EventConflict: as `create_jobs` (this call's rows are rolled back to a savepoint;
                the caller's own rows and transaction are left as they were).
        """
        with db.wrap_errors():
            return create_jobs_in(conn, new_jobs)

    def job_id_of(self, pipeline: str, event_id: str) -> UUID | None:
        """The id of the job of `pipeline` made for `event_id`, if there is one."""
        with db.single_statement(self.engine) as conn:
            row = conn.execute(queries.select_job_ids(pipeline, [event_id])).one_or_none()
            return row.id if row is not None else None

    def get_job(self, job_id: UUID) -> Job:
        """One job.

        Raises:
            JobNotFound: no job has that id.
        """
        with db.single_statement(self.engine) as conn:
            row = conn.execute(queries.select_job(job_id)).mappings().one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    def history(self, job_id: UUID) -> JobHistory:
        """A job, every ledger entry it claimed or adopted, and its events, oldest first.

        Raises:
            JobNotFound: no job has that id.
        """
        with db.transaction(self.engine) as conn:
            row = conn.execute(queries.select_job(job_id)).mappings().one_or_none()
            if row is None:
                raise JobNotFound(job_id)
            entries = conn.execute(queries.select_entries_for_job(job_id)).mappings().all()
            events = conn.execute(queries.select_events(job_id)).mappings().all()
            maps = conn.execute(queries.select_map_counters(job_id)).mappings().all()
        return JobHistory(
            job=job_from_row(row),
            entries=tuple(entry_from_row(e) for e in entries),
            events=tuple(event_from_row(e) for e in events),
            maps=tuple(counters_of(m["step"], m) for m in maps),
        )

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        limit: int = 50,
        pipeline: str | None = None,
        order_id: str | None = None,
    ) -> list[Job]:
        """The most recently created jobs, optionally of one state, pipeline or order id."""
        query = queries.select_jobs(state, limit, pipeline=pipeline, order_id=order_id)
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(query).mappings()
            return [job_from_row(row) for row in rows]

    def jobs_with_event_prefix(self, prefix: str) -> list[Job]:
        """Every job whose event id starts with `prefix`."""
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(queries.select_jobs_by_event_prefix(prefix)).mappings()
            return [job_from_row(row) for row in rows]

    def count_by_state(self, *, event_prefix: str | None = None) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zero included), optionally
        only those whose event id starts with `event_prefix`."""
        counts = dict.fromkeys(JobState, 0)
        with db.single_statement(self.engine) as conn:
            for row in conn.execute(queries.count_jobs_by_state(event_prefix)):
                counts[JobState(row.state)] = int(row.jobs)
        return counts

    def contexts(self, job_ids: Sequence[UUID]) -> dict[UUID, Mapping[str, JSON]]:
        """The contexts of some jobs, by id (jobs that do not exist are left out)."""
        ordered = sorted(set(job_ids))
        found: dict[UUID, Mapping[str, JSON]] = {}
        with db.transaction(self.engine) as conn:
            for start in range(0, len(ordered), _READ_BATCH):
                chunk = ordered[start : start + _READ_BATCH]
                found.update(
                    (row.id, row.context) for row in conn.execute(queries.select_contexts(chunk))
                )
        return found

    def entries_of_steps(
        self, steps: Sequence[tuple[str, str]], *, keys: Sequence[str] | None = None
    ) -> list[tuple[str, StepEntry]]:
        """The entries of some (pipeline, step) pairs as (pipeline, entry), by key; optionally
        only those of some keys."""
        chunks: list[Sequence[str] | None] = [None]
        if keys is not None:
            ordered = sorted(keys)
            chunks = [ordered[i : i + _READ_BATCH] for i in range(0, len(ordered), _READ_BATCH)]
        found: list[tuple[str, StepEntry]] = []
        with db.transaction(self.engine) as conn:
            for chunk in chunks:
                rows = conn.execute(queries.select_entries_of_steps(steps, chunk)).mappings()
                found.extend((row["pipeline"], entry_from_row(row)) for row in rows)
        return found

    def effects_in_context(self, *, pipeline_prefix: str) -> dict[str, str]:
        """Pipelines named with `pipeline_prefix` whose jobs' context names their effect kind."""
        query = queries.select_effects_in_context(pipeline_prefix)
        with db.single_statement(self.engine) as conn:
            return {row.pipeline: row.effect for row in conn.execute(query)}

    def cancel(self, job_id: UUID, *, by: str, reason: str | None = None) -> Job:
        """Cancel a pending or running job: no further step will be claimed. A step already
        acting finishes and is recorded (its effect is real), but the job does not move on.

        Returns:
            The job as it stands afterwards (check `state`: a finished job stays as it was).

        Raises:
            JobNotFound: no job has that id.
        """
        with db.transaction(self.engine) as conn:
            # Its timers first, as the timer loop locks them (then the job): a timer firing
            # meanwhile is waited for, and then is no longer pending; one cancelled never fires.
            conn.execute(queries.cancel_timers(job_id))
            cancelled = conn.execute(queries.finish_job(job_id, JobState.CANCELLED)).one_or_none()
            if cancelled is not None:
                # A record that moved the job to a wait as this began set a timer the first
                # statement did not see (it committed while this waited for the job's row).
                conn.execute(queries.cancel_unlocked_timers(conn.dialect.name, job_id))
                detail: JSON = {"by": by, "reason": reason}
                step = conn.execute(queries.select_job(job_id)).mappings().one()["current_step"]
                conn.execute(
                    queries.append_event(job_id, step or "-", EventKind.CANCELLED, detail=detail)
                )
        return self.get_job(job_id)

    def take_stalled(
        self, *, stalled_after: float, limit: int = 500, pipelines: Sequence[str] | None = None
    ) -> list[JobToSend]:
        """Take unfinished jobs (of `pipelines`, when given) that made no progress for
        `stalled_after` seconds, for the sweeper to send again; each is marked touched and its
        history says so. Concurrent sweepers get disjoint batches (SKIP LOCKED)."""
        with db.transaction(self.engine) as conn:
            statement = queries.take_stalled_jobs(
                conn.dialect.name, stalled_after, limit, pipelines
            )
            return self._taken(conn, statement, {"stalled_after": stalled_after})

    @staticmethod
    def _taken(conn: Connection, take: Update, detail: JSON) -> list[JobToSend]:
        """Run one of the sweeper's takes; each job taken gets a `redriven` event saying why."""
        taken = [
            JobToSend(row.id, row.pipeline, row.current_step, JobState(row.state))
            for row in conn.execute(take)
        ]
        if taken:
            # One statement for the batch's history, not one per job.
            events = [(job.job_id, job.step or "-") for job in taken]
            conn.execute(queries.append_events(events, EventKind.REDRIVEN, detail))
        return taken

    def recent_deliveries(self, *, window: float, fast_path: bool = False) -> int:
        """How many step messages workers dealt with in the last `window` seconds: the pace
        at which the broker's queues drain. On the fast path one message runs several steps
        (each with its history event), so messages are counted by how deliveries end."""
        query = (
            queries.count_recent_messages(window)
            if fast_path
            else queries.count_recent_deliveries(window)
        )
        with db.single_statement(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    def take_abandoned(
        self, *, again_after: float, limit: int = 500, pipelines: Sequence[str] | None = None
    ) -> list[JobToSend]:
        """Take unfinished jobs (of `pipelines`, when given) whose current step's owner died
        (its lease expired while the key was `started`) and that nobody sent again since — or
        not for `again_after` seconds, and still nobody claimed it — for the sweeper to send
        at once; each is marked touched and its history says so (disjoint per sweeper)."""
        with db.transaction(self.engine) as conn:
            statement = queries.take_abandoned_jobs(
                conn.dialect.name, limit, again_after, pipelines
            )
            return self._taken(conn, statement, {"lease_expired": True})

    def take_unfollowed(
        self, *, stalled_after: float, within: float, pipelines: Sequence[str], limit: int = 500
    ) -> list[JobToSend]:
        """Take succeeded jobs that hand on but that no job names as its parent (see
        `queries.take_unfollowed_jobs`), marked touched, with a history event saying so."""
        with db.transaction(self.engine) as conn:
            statement = queries.take_unfollowed_jobs(
                conn.dialect.name, stalled_after, within, limit, pipelines
            )
            return self._taken(conn, statement, {"unfollowed": True})

    def unclaimed_redrives(self, job_ids: Sequence[UUID]) -> dict[UUID, int]:
        """How many times the sweeper took each of these jobs that no worker ever claimed,
        since a person last replayed or resolved it (claimed jobs are left out)."""
        if not job_ids:
            return {}
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(queries.count_unclaimed_redrives(job_ids))
            return {row.job_id: int(row.redrives) for row in rows}

    def unclaimed_calls(
        self,
        *,
        prefix: str,
        excluded: Sequence[str],
        queues: Sequence[str],
        older_than: float,
        limit: int = 500,
    ) -> list[Job]:
        """Unfinished jobs of pipelines named `prefix…` but not in `excluded`, whose kept message
        goes to one of `queues`, never claimed and untouched for `older_than` seconds (see
        `queries.select_unclaimed_calls`)."""
        query = queries.select_unclaimed_calls(prefix, excluded, queues, older_than, limit)
        with db.single_statement(self.engine) as conn:
            return [job_from_row(row) for row in conn.execute(query).mappings()]

    def note_resend_failed(self, job_id: UUID, step: str, error: str) -> None:
        """Append to a job's history that the step the sweeper took did not reach the broker."""
        event = queries.append_event(
            job_id, step, EventKind.RESEND_FAILED, detail={"error": error[:500]}
        )
        with db.single_statement(self.engine) as conn:
            conn.execute(event)

    def count_children(self, task_id: str) -> int:
        """How many jobs name the decorated task's call `task_id` as their parent."""
        with db.single_statement(self.engine) as conn:
            statement = queries.count_children(conn.dialect.name, task_id)
            return int(conn.execute(statement).scalar_one())

    def take_sent_between(
        self,
        *,
        before: float,
        after: float | None = None,
        limit: int = 500,
        pipelines: Sequence[str] | None = None,
    ) -> list[JobToSend]:
        """Take unfinished jobs last touched between `after` and `before` seconds ago (`after`
        None: any time before), handed to the broker and not in flight, for the sweeper to
        send again: a broker that lost its queues lost their messages. Each is marked
        touched and its history says so; concurrent sweepers get disjoint batches."""
        with db.transaction(self.engine) as conn:
            statement = queries.take_jobs_sent_between(
                conn.dialect.name, before, after, limit, pipelines
            )
            detail: JSON = {"lost_by_broker": {"before": before, "after": after}}
            return self._taken(conn, statement, detail)

    def unfinished_steps(
        self, *, event_prefix: str
    ) -> tuple[datetime | None, list[UnfinishedStep]]:
        """The database's clock and the unfinished jobs whose event id starts with
        `event_prefix`, each with its current step's entry (the clock is None when there
        are none)."""
        with db.single_statement(self.engine) as conn:
            statement = queries.select_unfinished_steps(conn.dialect.name, event_prefix)
            rows = conn.execute(statement).mappings().all()
        steps = [
            UnfinishedStep(
                job_id=row["job_id"],
                key=row["key"],
                state=StepState(row["state"]) if row["state"] is not None else None,
                attempts=row["attempts"],
                locked_until=db.as_utc(row["locked_until"]),
            )
            for row in rows
        ]
        return (db.as_utc(rows[0]["now"]) if rows else None), steps

    def events_with_event_prefix(self, prefix: str) -> list[StepEvent]:
        """The history of every job whose event id starts with `prefix`, oldest first."""
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(queries.select_events_by_event_prefix(prefix)).mappings()
            return [event_from_row(row) for row in rows]

    def mark_dispatched(self, job_ids: Sequence[UUID]) -> None:
        """Note that these jobs' first step reached the broker (they leave the outbox)."""
        if job_ids:
            with db.single_statement(self.engine) as conn:
                conn.execute(queries.mark_dispatched(job_ids))

    def take_undispatched(self, *, older_than: float, limit: int = 500) -> list[JobToSend]:
        """Take jobs whose first step never reached the broker, for the relay to send; they
        count as dispatched from now on (`undo_dispatched` if the send fails)."""
        with db.transaction(self.engine) as conn:
            statement = queries.take_undispatched(conn.dialect.name, older_than, limit)
            return [
                JobToSend(row.id, row.pipeline, row.current_step, JobState(row.state))
                for row in conn.execute(statement)
            ]

    def take_announced(self, job_ids: Sequence[UUID]) -> list[JobToSend]:
        """Take the given jobs for the relay to send, those still in the outbox (another
        relay may have sent some); they count as dispatched from now on."""
        if not job_ids:
            return []
        with db.single_statement(self.engine) as conn:
            return [
                JobToSend(row.id, row.pipeline, row.current_step, JobState(row.state))
                for row in conn.execute(queries.take_announced(job_ids))
            ]

    def undo_dispatched(self, job_ids: Sequence[UUID]) -> None:
        """Put jobs back in the outbox."""
        if job_ids:
            with db.single_statement(self.engine) as conn:
                conn.execute(queries.undo_dispatched(job_ids))

    def prune(self, *, older_than: float, batch: int = 1000, item_batch: int = 5000) -> int:
        """Delete succeeded and cancelled jobs untouched for `older_than` seconds, with their
        ledger entries and history, in batches of `batch`; never an unfinished or
        dead-lettered job. Returns how many jobs were deleted. Their maps' items (and the
        items' entries) go first, `item_batch` to a transaction: a map of 100,000 items is
        not deleted in one.

        Their keys leave the ledger with them (the same request arriving again afterwards
        would act again, as with any provider's key retention) — except a key that another
        job still lists while it may claim it (unfinished or dead-lettered: the same request
        under another event id, say): that key stays, with its fingerprint, state and
        result, held by that job, so the job adopts the result instead of acting again.
        """
        deleted = 0
        while True:
            with db.transaction(self.engine) as conn:
                taken = queries.select_prunable_jobs(conn.dialect.name, older_than, batch)
                found: list[UUID] = list(conn.execute(taken).scalars())
            # A finished job stays finished: its items can go before it, each chunk alone.
            self._prune_items(found, item_batch)
            with db.transaction(self.engine) as conn:
                dialect = conn.dialect.name
                taken = queries.select_prunable_jobs(dialect, older_than, batch)
                job_ids: list[UUID] = list(conn.execute(taken).scalars())
                if job_ids:
                    kept = conn.execute(queries.select_keys_kept_for_others(dialect, job_ids))
                    for key, keeper in {row.key: row.keeper for row in kept}.items():
                        conn.execute(queries.hand_entry_to(key, keeper))
                    conn.execute(queries.delete_jobs(job_ids))
            deleted += len(job_ids)
            if len(job_ids) < batch:
                return deleted

    def _prune_items(self, job_ids: Sequence[UUID], batch: int) -> None:
        """Delete finished jobs' map items and their keys' entries, `batch` a transaction."""
        while job_ids:
            with db.transaction(self.engine) as conn:
                keys: list[str] = list(
                    conn.execute(queries.select_items_to_prune(job_ids, batch)).scalars()
                )
                if not keys:
                    return
                for delete in queries.delete_items(job_ids, keys):
                    conn.execute(delete)

    def ping(self) -> None:
        """One round trip to the database (raises `LedgerError` if it does not answer)."""
        with db.single_statement(self.engine) as conn:
            conn.execute(queries.ping())

    def count_events(self, kind: EventKind, job_ids: Sequence[UUID] | None = None) -> int:
        """How many history events of a kind exist, optionally for some jobs only."""
        with db.single_statement(self.engine) as conn:
            return int(conn.execute(queries.count_events(kind, job_ids)).scalar_one())


def job_from_row(row: RowMapping) -> Job:
    """A `Job` from a `jobs` row."""
    return Job(
        id=row["id"],
        pipeline=row["pipeline"],
        event_id=row["event_id"],
        state=JobState(row["state"]),
        context=row["context"],
        fingerprint=row["fingerprint"],
        step_keys=row["step_keys"],
        results=row["results"],
        current_step=row["current_step"],
        created_at=db.as_utc(row["created_at"]),
        updated_at=db.as_utc(row["updated_at"]),
        finished_at=db.as_utc(row["finished_at"]),
    )


def entry_from_row(row: RowMapping) -> StepEntry:
    """A `StepEntry` from a `ledger_entries` row."""
    return StepEntry(
        key=row["key"],
        job_id=row["job_id"],
        step=row["step"],
        state=StepState(row["state"]),
        fingerprint=row["fingerprint"],
        attempts=row["attempts"],
        result=row["result"],
        error=row["error"],
        locked_until=db.as_utc(row["locked_until"]),
        started_at=db.as_utc(row["started_at"]),
        finished_at=db.as_utc(row["finished_at"]),
    )


def event_from_row(row: RowMapping) -> StepEvent:
    """A `StepEvent` from a `step_events` row."""
    return StepEvent(
        id=row["id"],
        job_id=row["job_id"],
        step=row["step"],
        key=row["key"],
        attempt=row["attempt"],
        kind=EventKind(row["kind"]),
        at=db.as_utc(row["at"]),
        duration_ms=row["duration_ms"],
        detail=row["detail"],
    )
