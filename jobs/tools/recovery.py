"""How fast jobs recover from a fault, as `oncelery chaos` reports it: the seconds from each
kill -9 or restart to the next progress of the jobs it interrupted, read from the ledger."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from ledger import EventKind, JobStore, LedgerError, StepEvent, StepState

#: History kinds that show a job moved: an attempt recorded, or its result adopted.
PROGRESS = frozenset(
    {EventKind.SUCCEEDED, EventKind.FAILED, EventKind.DEDUPLICATED, EventKind.DEAD_LETTERED}
)
#: The faults a chaos run injects.
KILL, BROKER, DATABASE = "kill", "broker", "database"


@dataclass(frozen=True)
class Fault:
    """What the ledger showed just before a fault."""

    kind: str
    #: The database's clock, just before the fault.
    at: datetime
    #: Claims whose lease ran: (job, key, attempt).
    held: frozenset[tuple[UUID, str, int]]
    unfinished: frozenset[UUID]


@dataclass(frozen=True)
class Recovery:
    """The recovery of one kind of fault over a run."""

    faults: int
    interrupted: int
    unrecovered: int
    p50: float | None
    p99: float | None

    def as_json(self) -> dict[str, float | int | None]:
        """For `--json`."""
        return {
            "faults": self.faults,
            "interrupted": self.interrupted,
            "unrecovered": self.unrecovered,
            "p50_seconds": self.p50,
            "p99_seconds": self.p99,
        }

    def summary(self) -> str:
        """`p50/p99` in seconds, or `-` when nothing was interrupted."""
        if self.p50 is None or self.p99 is None:
            return "-"
        return f"{self.p50:.1f}/{self.p99:.1f}s"


def observe(store: JobStore, prefix: str, kind: str) -> Fault | None:
    """What the ledger shows of the run's unfinished jobs now, just before a fault of `kind`;
    None when the database does not answer (it is restarting) or nothing is unfinished."""
    try:
        now, steps = store.unfinished_steps(event_prefix=prefix)
    except LedgerError:
        return None
    if now is None:
        return None
    held = frozenset(
        (step.job_id, step.key, step.attempts)
        for step in steps
        if step.state is StepState.STARTED
        and step.key is not None
        and step.attempts is not None
        and step.locked_until is not None
        and step.locked_until > now
    )
    return Fault(kind, now, held, frozenset(step.job_id for step in steps))


def recoveries(
    faults: Sequence[Fault], events: Sequence[StepEvent], ended: datetime
) -> dict[str, Recovery]:
    """Each kind of fault's recovery times, by kind.

    Which jobs a fault interrupted is decided from what the ledger showed just before it:

    - a **kill**: the claims whose lease ran at that moment (key, attempt) and that never wrote
      an event of their own afterwards — their owner died (or was fenced) before recording. The
      ledger does not say which process owns a claim, so a claim another worker held and lost
      in a later kill counts for the earliest kill it was in flight at: the figure can only err
      long, never short;
    - a **restart** (broker or database): every job unfinished at that moment, in flight or
      queued, since a restart may have taken its message or its connection.

    A job's next progress is its first history event after the fault that records an attempt
    (`PROGRESS`); a re-drive is not progress. A job that never progressed counts until the run
    ended (a lower bound), and is counted as unrecovered.
    """
    by_job: dict[UUID, list[StepEvent]] = {}
    recorded: set[tuple[UUID, str | None, int | None]] = set()
    for event in events:
        by_job.setdefault(event.job_id, []).append(event)
        recorded.add((event.job_id, event.key, event.attempt))
    seconds: dict[str, list[float]] = {KILL: [], BROKER: [], DATABASE: []}
    unrecovered = dict.fromkeys(seconds, 0)
    counted: set[tuple[UUID, str, int]] = set()
    for fault in sorted(faults, key=lambda each: each.at):
        if fault.kind == KILL:
            lost = {held for held in fault.held if held not in recorded and held not in counted}
            counted |= lost
            interrupted = {job for job, _, _ in lost}
        else:
            interrupted = set(fault.unfinished)
        for job in interrupted:
            moved = _next_progress(by_job.get(job, []), fault.at)
            unrecovered[fault.kind] += moved is None
            seconds[fault.kind].append(((moved or ended) - fault.at).total_seconds())
    return {
        kind: Recovery(
            faults=sum(fault.kind == kind for fault in faults),
            interrupted=len(times),
            unrecovered=unrecovered[kind],
            p50=_percentile(times, 0.50),
            p99=_percentile(times, 0.99),
        )
        for kind, times in seconds.items()
    }


def _next_progress(events: Sequence[StepEvent], after: datetime) -> datetime | None:
    return min((e.at for e in events if e.at > after and e.kind in PROGRESS), default=None)


def _percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile, rounded to a tenth of a second."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(share * len(ordered)) - 1)], 1)
