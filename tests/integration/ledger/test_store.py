"""Creating jobs (conflicts), cancellation, the sweeper's claim of stalled jobs and retention,
on Postgres and SQLite."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from ledger import (
    AlreadySucceeded,
    Claim,
    DeadLetterReason,
    EventConflict,
    EventKind,
    JobState,
    JobStore,
    StepLedger,
    StepState,
    create_engine,
)
from ledger.schema import jobs
from tests.factories import create_job, new_job


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


def age(engine: sa.Engine, job_ids: list[uuid.UUID], seconds: int) -> None:
    """Pretend the jobs were last touched `seconds` ago (the test controls the clock)."""
    with engine.begin() as conn:
        for job_id in job_ids:
            updated: datetime = conn.execute(
                sa.select(jobs.c.updated_at).where(jobs.c.id == job_id)
            ).scalar_one()
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(updated_at=updated - timedelta(seconds=seconds))
            )


def test_an_event_id_with_other_content_is_a_conflict_and_creates_nothing(
    store: JobStore,
) -> None:
    """Given an event already enqueued, when it comes again with other content beside a new
    event, then the conflict names the event and its place, and the new event is not created
    either: the input is taken whole or not at all."""
    plan = new_job()
    [(job_id, _)] = store.create_jobs([plan])
    fresh, changed = new_job(), new_job(event_id=plan.event_id)

    with pytest.raises(EventConflict) as raised:
        store.create_jobs([fresh, changed])

    assert (raised.value.event_id, raised.value.index) == (plan.event_id, 1)
    assert [job.id for job in store.list_jobs(limit=10)] == [job_id]


def test_one_input_with_an_event_id_twice_and_two_contents_is_a_conflict(
    store: JobStore,
) -> None:
    first = new_job()
    twin = new_job(event_id=first.event_id, context=first.context)
    changed = new_job(event_id=first.event_id)

    with pytest.raises(EventConflict) as raised:
        store.create_jobs([first, twin, changed])

    assert raised.value.index == 2
    assert store.list_jobs(limit=10) == []


def test_cancel_stops_a_job_before_its_next_step(engine: sa.Engine, store: JobStore) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=30)
    job_id = create_job(store)
    first = ledger.claim_step(job_id, "first")
    assert isinstance(first, Claim)

    cancelled = store.cancel(job_id, by="bob", reason="asked")
    recorded = ledger.record_success(first, {"n": 1}, next_step="second", duration_ms=1.0)

    assert cancelled.state is JobState.CANCELLED
    assert recorded.job_state is JobState.CANCELLED  # the outcome is kept, the job stays put
    history = store.history(job_id)
    assert history.job.results == {"first": {"n": 1}}
    assert [e.kind for e in history.events] == [EventKind.CANCELLED, EventKind.SUCCEEDED]
    assert history.events[0].detail == {"by": "bob", "reason": "asked"}
    assert store.cancel(job_id, by="bob").state is JobState.CANCELLED
    assert len(store.history(job_id).events) == 2


def test_stalled_jobs_are_taken_once(engine: sa.Engine, store: JobStore) -> None:
    fresh, stalled = create_job(store), [create_job(store) for _ in range(3)]
    age(engine, stalled, 600)

    taken = store.take_stalled(stalled_after=60)

    assert sorted(job.job_id for job in taken) == sorted(stalled)
    assert {job.step for job in taken} == {"first"}
    assert store.take_stalled(stalled_after=60) == []  # touched: not stalled any more
    assert fresh not in [job.job_id for job in taken]
    assert store.history(stalled[0]).events[-1].kind is EventKind.REDRIVEN


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_sweepers_at_once_never_take_the_same_job(database_url: str, store: JobStore) -> None:
    stalled = [create_job(store) for _ in range(200)]
    age(store.engine, stalled, 600)
    engines = [create_engine(database_url) for _ in range(2)]
    taken: list[list[uuid.UUID]] = [[], []]
    barrier = threading.Barrier(2)

    def sweep(number: int) -> None:
        sweeper = JobStore(engine=engines[number])
        barrier.wait()
        while batch := sweeper.take_stalled(stalled_after=60, limit=10):
            taken[number].extend(job.job_id for job in batch)

    threads = [threading.Thread(target=sweep, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()

    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == sorted(stalled)
    assert taken[0], "both sweepers should have had work"
    assert taken[1], "both sweepers should have had work"


def test_prune_deletes_old_finished_jobs_only(engine: sa.Engine, store: JobStore) -> None:
    ledger = StepLedger(engine=engine, lease_seconds=30)

    def finished(state: JobState) -> uuid.UUID:
        job_id = create_job(store, steps=("only",))
        if state is JobState.SUCCEEDED:
            claim = ledger.claim_step(job_id, "only")
            assert isinstance(claim, Claim)
            ledger.record_success(claim, {}, next_step=None, duration_ms=1.0)
        elif state is JobState.CANCELLED:
            store.cancel(job_id, by="t")
        elif state is JobState.DEAD_LETTERED:
            from ledger import DeadLetterReason

            ledger.dead_letter(job_id, "only", {"type": "X"}, reason=DeadLetterReason.PERMANENT)
        return job_id

    old = {state: finished(state) for state in JobState}
    recent_success = finished(JobState.SUCCEEDED)
    age(engine, list(old.values()), 40 * 86_400)

    assert store.prune(older_than=30 * 86_400, batch=1) == 2

    remaining = {job.id for job in store.list_jobs(limit=100)}
    assert old[JobState.SUCCEEDED] not in remaining
    assert old[JobState.CANCELLED] not in remaining
    assert {
        old[JobState.PENDING],
        old[JobState.RUNNING],
        old[JobState.DEAD_LETTERED],
        recent_success,
    } <= remaining
    with engine.connect() as conn:
        orphans: int = conn.execute(
            sa.text("SELECT count(*) FROM ledger_entries WHERE job_id NOT IN (SELECT id FROM jobs)")
        ).scalar_one()
    assert orphans == 0


@pytest.mark.parametrize("twin_state", [JobState.PENDING, JobState.DEAD_LETTERED])
def test_prune_keeps_the_keys_a_twin_still_needs(
    engine: sa.Engine, store: JobStore, twin_state: JobState
) -> None:
    """Given a finished job and its twin (the same request under another event id: the same
    keys and fingerprint) that is still unfinished or dead-lettered, when the finished job is
    pruned, then its keys stay, held by the twin, and the twin's claim finds the recorded
    result instead of acting again; once the twin is pruned too, they go."""
    ledger = StepLedger(engine=engine, lease_seconds=30)
    base = f"twin:{uuid.uuid4().hex[:8]}"
    done = create_job(store, key_base=base, context={"sku": base})
    for step, following in (("first", "second"), ("second", None)):
        claim = ledger.claim_step(done, step)
        assert isinstance(claim, Claim)
        ledger.record_success(claim, {"step": step}, next_step=following, duration_ms=1.0)
    twin = create_job(store, key_base=base, context={"sku": base})
    if twin_state is JobState.DEAD_LETTERED:
        ledger.dead_letter(twin, "first", {"type": "X"}, reason=DeadLetterReason.PERMANENT)
    age(engine, [done], 40 * 86_400)

    assert store.prune(older_than=30 * 86_400) == 1

    entries = {entry.step: entry for entry in store.history(twin).entries}
    assert {step: (e.state, e.job_id) for step, e in entries.items()} == {
        "first": (StepState.SUCCEEDED, twin),
        "second": (StepState.SUCCEEDED, twin),
    }
    with engine.begin() as conn:  # the twin goes back to work (a replay, say)
        conn.execute(sa.update(jobs).where(jobs.c.id == twin).values(state=str(JobState.RUNNING)))
    again = ledger.claim_step(twin, "first")
    assert isinstance(again, AlreadySucceeded)
    assert again.result == {"step": "first"}

    store.cancel(twin, by="test")
    age(engine, [twin], 40 * 86_400)
    assert store.prune(older_than=30 * 86_400) == 1
    assert store.entries_of_steps([("plain", "first"), ("plain", "second")]) == []
