"""A read-only step's ledger calls on Postgres: read the job instead of claiming a key, record
the result fenced by the job's current step (claiming the next step in the same statement)."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from ledger import (
    Claim,
    Failure,
    JobState,
    JobStore,
    LeaseLost,
    PostgresStepLedger,
    Reading,
    ReadResult,
    Recorded,
    StepLedger,
    StepState,
    first_reading,
    queries,
)
from ledger.direct import for_engine
from tests.factories import create_job

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


@pytest.fixture
def ledger(engine: sa.Engine) -> PostgresStepLedger:
    ledger = StepLedger(engine=engine, lease_seconds=30)
    assert isinstance(ledger, PostgresStepLedger)
    return ledger


def read(ledger: StepLedger, job_id: uuid.UUID, step: str = "first") -> Reading:
    [reading] = ledger.read_steps([job_id], step)
    assert isinstance(reading, Reading), reading
    return reading


def test_a_read_step_is_recorded_and_the_next_claimed_in_one_statement(
    store: JobStore, ledger: StepLedger, statements: list[str]
) -> None:
    job_id = create_job(store)
    statements.clear()

    reading = read(ledger, job_id)
    [answer] = ledger.record_reads(
        [ReadResult(reading, {"price": 7}, 2.0)], next_step="second", claim_next=True
    )

    assert isinstance(answer, tuple)
    recorded, claimed = answer
    assert recorded.job_state is JobState.RUNNING
    assert isinstance(claimed, Claim)
    assert claimed.results == {"first": {"price": 7}}
    assert len(statements) == 2  # a read, and one write
    history = store.history(job_id)
    assert [(e.step, e.state, e.attempts) for e in history.entries] == [
        ("first", StepState.SUCCEEDED, 1),
        ("second", StepState.STARTED, 1),
    ]
    assert [(e.step, e.attempt, e.detail) for e in history.events] == [("first", 1, {"price": 7})]


def test_only_the_first_record_of_a_read_step_counts(store: JobStore, ledger: StepLedger) -> None:
    job_id = create_job(store)
    twice = [read(ledger, job_id), read(ledger, job_id)]  # two deliveries of the same job

    first = ledger.record_reads(
        [ReadResult(twice[0], {"n": 1}, 1.0)], next_step="second", claim_next=True
    )
    second = ledger.record_reads(
        [ReadResult(twice[1], {"n": 2}, 1.0)], next_step="second", claim_next=True
    )

    assert isinstance(first[0], tuple)
    assert second == [None]  # the job had moved on: nothing written
    assert store.get_job(job_id).results == {"first": {"n": 1}}
    assert len(store.history(job_id).events) == 1


def test_a_job_elsewhere_is_claimed_not_read(store: JobStore, ledger: StepLedger) -> None:
    moved_on = create_job(store)
    ledger.record_reads(
        [ReadResult(read(ledger, moved_on), {}, 1.0)], next_step="second", claim_next=False
    )
    held = create_job(store)
    ledger.claim_step(held, "first")
    stopped = create_job(store)
    ledger.record_failure(_claimed(ledger, stopped), Failure(error={"type": "Boom"}, retry_in=None))

    found = ledger.read_steps([moved_on, held, stopped, uuid.uuid4()], "first")

    assert found == [None, None, None, None]


def test_a_read_after_a_failed_attempt_counts_it(store: JobStore, ledger: StepLedger) -> None:
    job_id = create_job(store)
    ledger.record_failure(
        _claimed(ledger, job_id), Failure(error={"type": "Timeout"}, retry_in=0.1)
    )

    reading = read(ledger, job_id)
    assert reading.attempt == 2
    ledger.record_reads([ReadResult(reading, {}, 1.0)], next_step="second", claim_next=False)

    [entry] = [e for e in store.history(job_id).entries if e.step == "first"]
    assert (entry.state, entry.attempts) == (StepState.SUCCEEDED, 2)


def test_a_read_record_fences_out_a_claim_another_delivery_holds(
    store: JobStore, ledger: StepLedger
) -> None:
    """A repeat of the step took the claim path meanwhile: the first record wins, and the
    claim's own record is refused (it does not move the job a second time)."""
    job_id = create_job(store)
    reading = read(ledger, job_id)
    other = _claimed(ledger, job_id)

    ledger.record_reads(
        [ReadResult(reading, {"from": "read"}, 1.0)], next_step="second", claim_next=False
    )

    with pytest.raises(LeaseLost):
        ledger.record_success(other, {"from": "claim"}, next_step="second", duration_ms=1.0)
    assert store.get_job(job_id).results == {"first": {"from": "read"}}


def test_the_last_step_read_finishes_the_job(store: JobStore, ledger: StepLedger) -> None:
    job_id = create_job(store, steps=("only",))

    [answer] = ledger.record_reads(
        [ReadResult(read(ledger, job_id, "only"), {"done": 1}, 1.0)],
        next_step=None,
        claim_next=False,
    )

    assert isinstance(answer, tuple)
    assert answer[0].job_state is JobState.SUCCEEDED
    job = store.get_job(job_id)
    assert (job.state, job.current_step, job.finished_at is not None) == (
        JobState.SUCCEEDED,
        None,
        True,
    )


def _claimed(ledger: StepLedger, job_id: uuid.UUID) -> Claim:
    claim = ledger.claim_step(job_id, "first")
    assert isinstance(claim, Claim)
    return claim


def test_a_job_cancelled_meanwhile_keeps_the_result_and_goes_no_further(
    store: JobStore, ledger: StepLedger
) -> None:
    job_id = create_job(store)
    reading = read(ledger, job_id)
    store.cancel(job_id, by="test")

    [answer] = ledger.record_reads(
        [ReadResult(reading, {"n": 1}, 1.0)], next_step="second", claim_next=True
    )

    assert answer == (Recorded(reading.key, JobState.CANCELLED), None)
    job = store.get_job(job_id)
    assert (job.state, job.current_step, job.results) == (
        JobState.CANCELLED,
        "first",
        {"first": {"n": 1}},
    )
    assert [e.step for e in store.history(job_id).entries] == ["first"]


@pytest.mark.parametrize("since", ["failed", "held", "done by another job"])
def test_a_reading_not_read_records_only_while_its_key_is_untouched(
    store: JobStore, ledger: StepLedger, since: str
) -> None:
    """The reading a job's first message brought stands for a read as the job was created:
    once another run tried, holds or did the step (or another job did), it writes
    nothing, and the run falls back on a claim."""
    base = f"same:{uuid.uuid4().hex[:8]}"
    job_id = create_job(store, key_base=base, context={"sku": base})
    job = store.get_job(job_id)
    assumed = first_reading(job_id, "first", job.step_keys["first"], job.context)
    if since == "done by another job":
        # The same request under another event id: the same keys and fingerprint.
        other = create_job(store, key_base=base, context={"sku": base})
        ledger.record_success(
            _claimed(ledger, other), {"n": 0}, next_step="second", duration_ms=1.0
        )
    else:
        held = _claimed(ledger, job_id)
        if since == "failed":
            ledger.record_failure(held, Failure(error={"type": "Timeout"}, retry_in=1.0))
    before = store.history(job_id)

    [answer] = ledger.record_reads(
        [ReadResult(assumed, {"n": 1}, 1.0)], next_step="second", claim_next=True
    )

    assert answer is None
    assert store.history(job_id) == before


@pytest.mark.parametrize("differs", ["context", "key"])
def test_a_reading_that_differs_from_the_job_records_nothing(
    store: JobStore, ledger: StepLedger, differs: str
) -> None:
    """A message's reading is its word only: one that disagrees with the job's row (stale, or
    forged by whoever can publish to the broker) records nothing, and the run falls back
    on a claim, which runs the step on the row."""
    job_id = create_job(store, context={"amount": 100})
    job = store.get_job(job_id)
    key, context = job.step_keys["first"], dict(job.context)
    if differs == "context":
        context["amount"] = 1
    else:
        key = f"{key}:forged"
    brought = first_reading(job_id, "first", key, context)
    before = store.history(job_id)

    [answer] = ledger.record_reads(
        [ReadResult(brought, {"charged": context["amount"]}, 1.0)],
        next_step="second",
        claim_next=True,
    )

    assert answer is None
    assert store.history(job_id) == before


def test_a_reading_not_read_is_recorded_on_a_job_cancelled_since(
    store: JobStore, ledger: StepLedger
) -> None:
    """As a read one: the step ran, its result stays, the job goes no further."""
    job_id = create_job(store)
    job = store.get_job(job_id)
    assumed = first_reading(job_id, "first", job.step_keys["first"], job.context)
    store.cancel(job_id, by="test")

    [answer] = ledger.record_reads(
        [ReadResult(assumed, {"n": 1}, 1.0)], next_step="second", claim_next=True
    )

    assert answer == (Recorded(assumed.key, JobState.CANCELLED), None)
    assert store.get_job(job_id).results == {"first": {"n": 1}}


def test_a_reading_not_read_is_recorded_like_a_read_one(
    store: JobStore, ledger: StepLedger, statements: list[str]
) -> None:
    job_id = create_job(store)
    job = store.get_job(job_id)
    statements.clear()

    assumed = first_reading(job_id, "first", job.step_keys["first"], job.context)
    [answer] = ledger.record_reads(
        [ReadResult(assumed, {"price": 7}, 2.0)], next_step="second", claim_next=True
    )

    assert isinstance(answer, tuple)
    assert isinstance(answer[1], Claim)
    assert len(statements) == 1  # no read: one write
    assert [(e.step, e.state) for e in store.history(job_id).entries] == [
        ("first", StepState.SUCCEEDED),
        ("second", StepState.STARTED),
    ]


def test_a_key_used_by_another_request_is_not_read_but_claimed(
    store: JobStore, ledger: StepLedger
) -> None:
    first = create_job(store, key_base="order:9", context={"amount": 1})
    ledger.record_failure(_claimed(ledger, first), Failure(error={"type": "X"}, retry_in=0.1))
    other = create_job(store, key_base="order:9", context={"amount": 2})

    assert ledger.read_steps([other], "first") == [None]


def test_a_read_record_under_a_key_used_by_another_request_moves_nothing(
    store: JobStore, ledger: StepLedger
) -> None:
    """The other request's claim came after the read: the record is refused."""
    other = create_job(store, key_base="order:10", context={"amount": 2})
    reading = read(ledger, other)
    first = create_job(store, key_base="order:10", context={"amount": 1})
    _claimed(ledger, first)

    assert ledger.record_reads(
        [ReadResult(reading, {}, 1.0)], next_step="second", claim_next=True
    ) == [None]
    assert store.get_job(other).current_step == "first"


def test_another_jobs_claim_on_the_same_key_is_left_alone(
    store: JobStore, ledger: StepLedger
) -> None:
    """Two events for one order share the read-only step's key: each job records its own
    result, and neither fences the other's claim."""
    one = create_job(store, key_base="order:11", context={"amount": 1})
    two = create_job(store, key_base="order:11", context={"amount": 1})
    reading = read(ledger, two)
    held = _claimed(ledger, one)

    ledger.record_reads([ReadResult(reading, {"n": 2}, 1.0)], next_step="second", claim_next=False)
    recorded = ledger.record_success(held, {"n": 1}, next_step="second", duration_ms=1.0)

    assert recorded.job_state is JobState.RUNNING
    assert store.get_job(one).results == {"first": {"n": 1}}
    assert store.get_job(two).results == {"first": {"n": 2}}


def test_a_read_record_retried_after_an_ambiguous_commit_knows_its_own(
    store: JobStore, ledger: PostgresStepLedger, engine: sa.Engine
) -> None:
    job_id = create_job(store)
    reading = read(ledger, job_id)
    done = [ReadResult(reading, {"n": 1}, 1.0)]
    [first] = ledger.record_reads(done, next_step="second", claim_next=True)
    assert isinstance(first, tuple)
    assert isinstance(first[1], Claim)
    owner = first[1].owner
    # The same record again, with the same owner token, as `retrying` would after a commit
    # whose answer was lost.
    [row] = ledger._many(
        queries.record_read_template(True, True, True),
        [
            {
                **queries.read_only_params(
                    job_id=job_id, step="first", owner=owner, result={"n": 1},
                    duration_ms=1.0, next_step="second",
                    ran_on=(reading.key, reading.context),
                ),
                **queries.claim_params(job_id, "second", owner, 30),
            }
        ],
    )  # fmt: skip
    assert row is None
    again = ledger._read_answer(reading, owner, row, "second", True)

    assert again is not None
    recorded, claim = again
    assert recorded.job_state is JobState.RUNNING
    assert isinstance(claim, Claim)
    assert (claim.owner, claim.attempt) == (owner, 1)


def test_the_read_record_finds_its_rows_by_index_even_in_a_generic_plan(engine: sa.Engine) -> None:
    """Its statement runs thousands of times on one prepared plan, often made while the ledger
    was nearly empty: a hashed subquery (every entry, on every run) or a scan would grow with
    the ledger."""
    direct = for_engine(engine)
    compiled = direct._compile(queries.record_read_template(True, True, True))
    with engine.connect() as conn:
        # Rows enough to make a scan cost more than an index (rolled back at the end).
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, pipeline, event_id, state, context, fingerprint, step_keys,"
            " results, created_at, updated_at) SELECT gen_random_uuid(), 'plan', 'e' || n,"
            " 'succeeded', '{}', 'f', jsonb_build_object('first', 'plan:' || n), '{}', now(),"
            " now() FROM generate_series(1, 3000) AS n"
        )
        conn.exec_driver_sql(
            "INSERT INTO ledger_entries (key, job_id, step, state, fingerprint, attempts,"
            " created_at, updated_at) SELECT step_keys ->> 'first', id, 'first', 'succeeded',"
            " 'f', 1, now(), now() FROM jobs WHERE pipeline = 'plan'"
        )
        conn.exec_driver_sql("ANALYZE jobs, ledger_entries")
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(f"PREPARE record_read AS {compiled.sql}")
        nulls = ", ".join(["NULL"] * len(compiled.order))
        plan = "\n".join(
            row[0] for row in conn.exec_driver_sql(f"EXPLAIN EXECUTE record_read({nulls})")
        )
        conn.exec_driver_sql("DEALLOCATE record_read")
        conn.rollback()

    assert "Seq Scan" not in plan, plan
    # A subquery Postgres cannot turn into a join (one under an OR, say) runs as a subplan,
    # and on a near-empty ledger, where plans are often made, a hashed one.
    assert "SubPlan" not in plan, plan
