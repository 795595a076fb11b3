"""Limits held in the ledger, on real Postgres and SQLite: a rate limit's token (one GCRA
statement, taken in the claim), a concurrency limit's slot (a lease: renewed with the key's,
freed by the record, back within one lease when its holder dies), a refused claim that
uses no attempt, and the wait it becomes (a `limit` timer)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from ledger import (
    Claim,
    ClaimOutcome,
    DeadLetterReason,
    Failure,
    InFlight,
    JobState,
    JobStore,
    KeySource,
    LedgerError,
    LimitBusy,
    LimitKind,
    LimitRules,
    RateRule,
    RetryPending,
    SlotRule,
    StepLedger,
    StepResult,
    TimerKind,
    create_engine,
)
from ledger.limits import LimitLedger
from ledger.schema import ledger_entries, limit_keys, step_events, timers
from tests.factories import new_job

CUSTOMER = ((KeySource.TEXT, "customer:"), (KeySource.CONTEXT, "customer_id"))


def rate(interval: float, *, burst: int = 1, hold: float = 0.0, key: str = "") -> LimitRules:
    name = key or f"provider:{uuid.uuid4().hex[:8]}"
    return LimitRules(rate=RateRule(name, ((KeySource.TEXT, name),), interval, burst, hold))


def slots(limit: int = 1) -> LimitRules:
    return LimitRules(slots=SlotRule("customer:{customer_id}", CUSTOMER, limit))


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine=engine)


def jobs_of(store: JobStore, customer: str, count: int) -> list[uuid.UUID]:
    plans = [new_job(context={"customer_id": customer, "n": n}) for n in range(count)]
    return [job_id for job_id, _ in store.create_jobs(plans)]


def ledger(engine: sa.Engine, lease: float = 30.0) -> StepLedger:
    return StepLedger(engine=engine, lease_seconds=lease)


def claim(led: StepLedger, job: uuid.UUID, rules: LimitRules) -> ClaimOutcome:
    return led.claim_step(job, "first", limits=rules)


def claimed(found: ClaimOutcome | LedgerError | None) -> Claim:
    assert isinstance(found, Claim), found
    return found


def busy(found: ClaimOutcome | LedgerError | None) -> LimitBusy:
    assert isinstance(found, LimitBusy), found
    return found


def entries(engine: sa.Engine, jobs: Sequence[uuid.UUID]) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(ledger_entries.c.job_id.in_(list(jobs)))
        return int(conn.execute(query).scalar_one())


# --- rate ---------------------------------------------------------------------------------


def test_a_rate_limit_grants_one_token_an_interval_and_refuses_the_rest(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given a rate limit of one token every 0.4 s, no burst, no hold
    rules = rate(0.4)
    led, jobs = ledger(engine), jobs_of(store, "c", 3)

    # When three jobs claim at once
    first = claimed(claim(led, jobs[0], rules))
    refused = busy(claim(led, jobs[1], rules))

    # Then the first acts now; the second is refused, told when the next token is free,
    # and nothing is claimed for it: no entry, no attempt used
    assert first.not_before is None
    assert refused.kind is LimitKind.RATE
    assert refused.limit == rules.rate.template  # type: ignore[union-attr]
    assert 0.2 < refused.retry_in <= 0.4
    assert entries(engine, jobs[1:]) == 0
    # and once the interval has passed, the next token is there
    time.sleep(refused.retry_in + 0.02)
    assert claimed(claim(led, jobs[1], rules)).attempt == 1
    busy(claim(led, jobs[2], rules))


def test_a_token_within_the_hold_is_taken_ahead_and_waited_for(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given tokens 0.2 s apart, which a claim may take up to 0.5 s ahead
    rules = rate(0.2, hold=0.5)
    led, jobs = ledger(engine), jobs_of(store, "c", 5)

    # When five jobs claim at once
    started = time.monotonic()
    found = [claim(led, job, rules) for job in jobs]

    # Then the first three take the next three tokens, each due an interval after the one
    # before (the first at once), and the rest are refused
    assert claimed(found[0]).not_before is None
    for index, each in enumerate(found[1:3], start=1):
        due = claimed(each).not_before
        assert due is not None
        assert due - started == pytest.approx(0.2 * index, abs=0.06)
    assert [type(each) for each in found[3:]] == [LimitBusy, LimitBusy]


def test_a_burst_grants_that_many_at_once_after_a_quiet_spell(
    engine: sa.Engine, store: JobStore
) -> None:
    rules = rate(0.3, burst=3)
    led, jobs = ledger(engine), jobs_of(store, "c", 4)

    found = [claim(led, job, rules) for job in jobs]

    assert [claimed(each).not_before for each in found[:3]] == [None] * 3
    busy(found[3])


# --- concurrency --------------------------------------------------------------------------


def test_a_slot_is_held_from_the_claim_to_the_record(engine: sa.Engine, store: JobStore) -> None:
    # Given one slot per customer, and two jobs of one customer and one of another
    rules = slots(1)
    led = ledger(engine)
    first, second = jobs_of(store, "alice", 2)
    [other] = jobs_of(store, "bob", 1)

    # When the first claims, the second is refused, the other customer's is not
    held = claimed(claim(led, first, rules))
    refused = busy(claim(led, second, rules))
    assert (refused.kind, refused.limit) == (LimitKind.CONCURRENCY, "customer:alice")
    assert 0 < refused.retry_in <= 1.0
    claimed(claim(led, other, rules))

    # Then the first's record frees the slot
    led.record_success(held, {"ok": True}, next_step="second", duration_ms=1.0)
    claimed(claim(led, second, rules))


def test_a_dead_holders_slot_comes_back_within_one_lease_and_a_renewed_one_does_not(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given leases of 1 s and one slot per customer
    rules = slots(1)
    led = ledger(engine, lease=1.0)
    renewed, waiting, after_kill = jobs_of(store, "carol", 3)

    # When a holder keeps renewing its lease past the first one
    held = claimed(claim(led, renewed, rules))
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        assert led.renew_leases([held]) == [True]
        busy(claim(led, waiting, rules))
        time.sleep(0.3)

    # Then nobody gets its slot; and once it stops renewing (its worker was killed), the
    # slot comes back within one lease
    killed_at = time.monotonic()
    while isinstance(claim(led, waiting, rules), LimitBusy):
        assert time.monotonic() - killed_at < 1.5, "the slot did not come back"
        time.sleep(0.05)
    assert time.monotonic() - killed_at >= 0.6
    busy(claim(led, after_kill, rules))


def test_a_limit_of_two_holds_two_at_a_time(engine: sa.Engine, store: JobStore) -> None:
    rules = slots(2)
    led, jobs = ledger(engine), jobs_of(store, "dave", 3)

    found = [claim(led, job, rules) for job in jobs]

    first, _ = claimed(found[0]), claimed(found[1])
    busy(found[2])
    led.record_success(first, None, next_step="second", duration_ms=1.0)
    claimed(claim(led, jobs[2], rules))


def test_a_key_in_flight_is_answered_as_without_limits_and_takes_no_slot(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given a job whose step another owner holds (a duplicate delivery)
    rules = slots(1)
    led = ledger(engine)
    job, other = jobs_of(store, "erin", 2)
    claimed(claim(led, job, rules))

    # When the duplicate claims it, it hears of the key in flight, not of the limit
    assert isinstance(claim(led, job, rules), InFlight)
    # and the slot is still the first claim's alone
    busy(claim(led, other, rules))


def test_a_stray_copy_fenced_by_its_pending_retry_timer_takes_no_token_and_no_wait(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given a step limited to 3 tokens at once (then one a minute) and one slot a customer,
    # and a job whose attempt failed with its retry waiting as a timer, an hour away
    name = f"provider:{uuid.uuid4().hex[:8]}"
    rules = LimitRules(
        rate=RateRule(name, ((KeySource.TEXT, name),), 60.0, 3, 0.0),
        slots=SlotRule("customer:{customer_id}", CUSTOMER, 1),
    )
    led = ledger(engine)
    [job] = jobs_of(store, "fay", 1)
    failure = Failure({"message": "429"}, retry_in=3600.0, retry_timer=True)
    led.record_failure(claimed(claim(led, job, rules)), failure)

    def granted() -> int:
        with engine.connect() as conn:
            query = sa.select(limit_keys.c.granted).where(limit_keys.c.key == name)
            return int(conn.execute(query).scalar_one())

    # When a stray copy of the step claims it (a redelivery), a token being free
    assert isinstance(claim(led, job, rules), RetryPending)
    # Then it takes no token (the retry fence refuses the key: its limits are not asked)
    assert granted() == 1
    # and, the tokens gone, it hears of the fence, not of the limit (no limit wait for it)
    for other in jobs_of(store, "gus", 1) + jobs_of(store, "hal", 1):
        claimed(claim(led, other, rules))
    assert isinstance(claim(led, job, rules), RetryPending)
    assert granted() == 3


def test_the_fast_path_takes_the_next_steps_limits_in_its_record(
    engine: sa.Engine, store: JobStore, statements: list[str]
) -> None:
    # Given two jobs of one customer, each having done its first step
    rules = slots(1)
    led = ledger(engine)
    jobs = jobs_of(store, "frank", 2)
    done = [StepResult(claimed(led.claim_step(job, "first")), {"n": 1}, 1.0) for job in jobs]

    # When each records it and claims the next step (limited) in one statement
    statements.clear()
    answers = [
        led.record_and_claim_next_steps([each], next_step="second", limits=rules) for each in done
    ]

    # Then one gets the slot, the other is recorded and refused the next step
    [(first, first_next)] = answers[0]  # type: ignore[misc]
    [(second, second_next)] = answers[1]  # type: ignore[misc]
    assert first.job_state is second.job_state is JobState.RUNNING
    claimed(first_next)
    assert busy(second_next).step == "second"
    if engine.dialect.name == "postgresql":
        # one round trip each, as without limits
        assert len(statements) == 2, statements


def test_a_claim_with_limits_is_still_one_statement_on_postgres(
    engine: sa.Engine, store: JobStore, statements: list[str]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs a claim as a few statements in one transaction")
    both = LimitRules(rate=rate(0.001).rate, slots=slots(1).slots)
    led, [job, other] = ledger(engine), jobs_of(store, "gina", 2)
    claimed(led.claim_step(other, "first"))

    statements.clear()
    claimed(claim(led, job, both))
    with_limits = len(statements)
    statements.clear()
    claimed(led.claim_step(other, "second"))

    assert with_limits == len(statements) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_claimants_racing_for_one_slot_never_hold_it_together(
    engine: sa.Engine, store: JobStore, database_url: str
) -> None:
    # Given one slot per customer and eight threads (each a worker) claiming one customer's
    # jobs as fast as they can, each recording at once
    rules = slots(1)
    jobs = jobs_of(store, "hank", 160)
    queue = list(jobs)
    lock = threading.Lock()
    holding: list[int] = []
    overlaps: list[int] = []
    engines = [create_engine(database_url) for _ in range(8)]

    def worker(index: int) -> None:
        led = ledger(engines[index])
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop()
            found = claim(led, job, rules)
            if not isinstance(found, Claim):
                with lock:
                    queue.insert(0, job)
                continue
            with lock:
                holding.append(index)
                overlaps.append(len(holding))
            time.sleep(0.001)
            with lock:
                holding.remove(index)
            led.record_success(found, None, next_step="second", duration_ms=1.0)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for each in engines:
        each.dispose()

    # Then every job got the slot once, and never two at a time
    assert len(overlaps) == len(jobs)
    assert max(overlaps) == 1


# --- waits --------------------------------------------------------------------------------


def test_a_refused_step_waits_as_a_timer_and_says_so(engine: sa.Engine, store: JobStore) -> None:
    # Given a rate limit whose token is taken
    rules = rate(0.5)
    led, limits = ledger(engine), LimitLedger(engine=engine)
    jobs = jobs_of(store, "ivy", 4)
    claimed(claim(led, jobs[0], rules))

    # When three more are refused and wait
    waits = [limits.wait(busy(claim(led, job, rules)), rules) for job in jobs[1:]]

    # Then each waits as a `limit` timer for its step, the waiters in line one interval
    # apart (never all at once), and its history says what it waits for
    gaps = [(b.due_at - a.due_at).total_seconds() for a, b in itertools.pairwise(waits)]
    assert gaps == [pytest.approx(0.5, abs=0.01)] * 2
    with engine.connect() as conn:
        rows = conn.execute(sa.select(timers).where(timers.c.job_id.in_(jobs))).all()
        events = conn.execute(
            sa.select(step_events.c.detail).where(
                step_events.c.job_id == jobs[1], step_events.c.kind == "limited"
            )
        ).all()
    assert (
        sorted((row.kind, row.step, row.item_id, row.state) for row in rows)
        == [(str(TimerKind.LIMIT), "first", "", "pending")] * 3
    )
    assert rules.rate is not None
    assert {row.limit_key for row in rows} == {rules.rate.template}
    [(detail,)] = events
    assert isinstance(detail, dict)
    assert detail == {"limit": rules.rate.template, "kind": "rate", "until": detail["until"]}


def test_a_job_ended_gives_back_its_slot_and_its_limit_waits_end_with_it(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given one slot a customer, held by one order, two more waiting for it as timers
    rules = slots(1)
    led, limits = ledger(engine), LimitLedger(engine=engine)
    holder, dropped, cancelled, later = jobs_of(store, "jon", 4)
    held = claimed(claim(led, holder, rules))
    for job in (dropped, cancelled):
        limits.wait(busy(claim(led, job, rules)), rules)

    # When a person cancels one waiter, the other is dead-lettered
    store.cancel(cancelled, by="test")
    led.dead_letter(dropped, "first", {"message": "gone"}, reason=DeadLetterReason.PERMANENT)

    # Then their limit timers never fire
    with engine.connect() as conn:
        query = sa.select(timers.c.state).where(timers.c.job_id.in_([dropped, cancelled]))
        states: list[str] = list(conn.execute(query).scalars())
    assert states == ["cancelled", "cancelled"]
    # and the holder, its attempt failing for good (dead-lettered), gives its slot back
    led.record_failure(held, Failure({"message": "declined"}, retry_in=None))
    claimed(claim(led, later, rules))


def test_the_limits_in_use_and_waiting_are_counted_for_people(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given a customer's slot held, two of its jobs waiting, and a rate limit's two tokens
    led, limits = ledger(engine), LimitLedger(engine=engine)
    one = slots(1)
    held, *waiting = jobs_of(store, "jill", 3)
    claimed(claim(led, held, one))
    for job in waiting:
        limits.wait(busy(claim(led, job, one)), one)
    paced = rate(0.01, burst=5, key="provider:stats")
    for job in jobs_of(store, "kim", 2):
        claimed(claim(led, job, paced))

    # When people look
    found = {each.key: each for each in limits.stats()}

    # Then the slot is in use with two waiting, the rate limit granted two this second
    customer = found["customer:jill"]
    assert (customer.kind, customer.in_use, customer.waiting) == (LimitKind.CONCURRENCY, 1, 2)
    assert customer.throttled_total == 2
    assert customer.throttled_per_second == round(2 / 60, 3)
    provider = found["provider:stats"]
    assert (provider.kind, provider.in_use, provider.waiting) == (LimitKind.RATE, 2, 0)
    assert provider.granted_total == 2
    # and a count stops past its cap (one more than the cap: more), however many wait
    capped = {each.key: each for each in limits.stats(waiting_cap=1)}["customer:jill"]
    assert (capped.waiting, capped.throttled_per_second) == (2, round(2 / 60, 3))
    capped = {each.key: each for each in limits.stats(waiting_cap=0)}["customer:jill"]
    assert (capped.waiting, capped.throttled_per_second) == (1, round(1 / 60, 3))


def test_a_slots_waiters_are_lined_up_not_polling_together(
    engine: sa.Engine, store: JobStore
) -> None:
    # Given a customer's one slot held and four more of its jobs refused
    rules = slots(1)
    led, limits = ledger(engine), LimitLedger(engine=engine)
    held, *waiting = jobs_of(store, "lena", 5)
    claimed(claim(led, held, rules))

    # When they wait
    waits = [limits.wait(busy(claim(led, job, rules)), rules) for job in waiting]

    # Then they wake one after another, a fifth of a second apart, the first within a second
    gaps = [(b.due_at - a.due_at).total_seconds() for a, b in itertools.pairwise(waits)]
    assert gaps == [pytest.approx(0.2, abs=0.01)] * 3
