"""The recovery figures of `oncelery chaos`: which jobs a fault interrupted, and how long until
they moved again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from jobs.tools.recovery import BROKER, KILL, Fault, Recovery, recoveries
from ledger import EventKind, StepEvent

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def event(
    job: uuid.UUID, seconds: float, kind: EventKind, key: str | None = None, attempt: int = 1
) -> StepEvent:
    return StepEvent(
        id=0,
        job_id=job,
        step="act",
        key=key,
        attempt=attempt if key else None,
        kind=kind,
        at=at(seconds),
        duration_ms=None,
        detail=None,
    )


def test_a_kill_counts_the_claims_that_never_recorded() -> None:
    # Given two claims in flight at a kill: one's owner died, the other recorded
    died, lived = uuid.uuid4(), uuid.uuid4()
    kill = Fault(KILL, at(10), frozenset({(died, "k1", 1), (lived, "k2", 1)}), frozenset())
    events = [
        event(lived, 10.5, EventKind.SUCCEEDED, "k2", 1),
        event(died, 14.0, EventKind.REDRIVEN),  # a re-drive is not progress
        event(died, 16.0, EventKind.SUCCEEDED, "k1", 2),
    ]

    found = recoveries([kill], events, ended=at(60))

    # Then only the dead owner's job is interrupted, and it moved 6 s after the kill
    assert found[KILL] == Recovery(faults=1, interrupted=1, unrecovered=0, p50=6.0, p99=6.0)


def test_a_claim_in_flight_at_two_kills_counts_for_the_first() -> None:
    job = uuid.uuid4()
    held = frozenset({(job, "k1", 1)})
    faults = [Fault(KILL, at(10), held, frozenset()), Fault(KILL, at(12), held, frozenset())]
    events = [event(job, 20.0, EventKind.FAILED, "k1", 2)]

    found = recoveries(faults, events, ended=at(60))

    assert (found[KILL].faults, found[KILL].interrupted, found[KILL].p99) == (2, 1, 10.0)


def test_a_restart_interrupts_every_unfinished_job() -> None:
    jobs = [uuid.uuid4() for _ in range(3)]
    restart = Fault(BROKER, at(0), frozenset(), frozenset(jobs))
    events = [
        event(jobs[0], 2.0, EventKind.SUCCEEDED, "a"),
        event(jobs[1], 30.0, EventKind.DEAD_LETTERED, "b"),
    ]

    found = recoveries([restart], events, ended=at(100))

    # Then the job that never moved counts until the end of the run, as unrecovered
    assert found[BROKER] == Recovery(faults=1, interrupted=3, unrecovered=1, p50=30.0, p99=100.0)
    assert found[KILL].summary() == "-"
    assert found[BROKER].summary() == "30.0/100.0s"
