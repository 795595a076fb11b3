"""The five invariants of DESIGN.md, checked after a run has gone quiet, counted at the
provider: what a chaos run (and its tests) must never break."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from jobs.ops.audit import AuditReport
from jobs.ops.effects import Effect
from ledger import DeadLetter, Job, JobState


@dataclass(frozen=True)
class InvariantReport:
    """What a finished run did, and every invariant it broke."""

    orders: int
    completed: int
    dead_lettered: int
    stuck: int
    charges: int
    duplicate_charges: int
    notifications: int
    duplicate_notifications: int
    violations: list[str] = field(default_factory=list)


def check_invariants(
    jobs: Sequence[Job],
    effects: Sequence[Effect],
    dead_letters: Sequence[DeadLetter],
    audit: AuditReport,
) -> InvariantReport:
    """Check a run's jobs against the provider's effects for their orders.

    1. every accepted order is succeeded, or dead-lettered with a reason;
    2. charges per order: 1 if succeeded, at most 1 if dead-lettered; notifications: 1 iff
       succeeded;
    3. every effect maps to one ledger key that is succeeded or unknown (the audit);
    4. no job is left pending or running;
    5. no effect for a key that was never enqueued (the audit, over the run's scope).
    """
    violations: list[str] = []
    charges = Counter(e.order_id for e in effects if e.kind == "charge")
    notifications = Counter(e.order_id for e in effects if e.kind == "notification")
    lettered = {letter.job_id for letter in dead_letters}
    states = Counter(job.state for job in jobs)
    for job in jobs:
        order = str(job.context.get("order_id"))
        violations.extend(_order_violations(job, order, charges[order], notifications[order]))
        if job.state is JobState.DEAD_LETTERED and job.id not in lettered:
            violations.append(f"job {job.id} is dead-lettered without a dead letter")
    violations.extend(
        f"audit: {d.problem} {d.kind} key={d.key} order={d.order_id}" for d in audit.drift
    )
    return InvariantReport(
        orders=len(jobs),
        completed=states[JobState.SUCCEEDED],
        dead_lettered=states[JobState.DEAD_LETTERED],
        stuck=states[JobState.PENDING] + states[JobState.RUNNING],
        charges=sum(charges.values()),
        duplicate_charges=sum(max(0, n - 1) for n in charges.values()),
        notifications=sum(notifications.values()),
        duplicate_notifications=sum(max(0, n - 1) for n in notifications.values()),
        violations=violations,
    )


def _order_violations(job: Job, order: str, charged: int, notified: int) -> list[str]:
    if job.state is JobState.SUCCEEDED:
        wrong = [
            f"{charged} charges" if charged != 1 else "",
            f"{notified} notifications" if notified != 1 else "",
        ]
        return [f"order {order} succeeded with {w}" for w in wrong if w]
    if job.state is JobState.DEAD_LETTERED:
        wrong = [
            f"{charged} charges" if charged > 1 else "",
            f"{notified} notifications" if notified else "",
        ]
        return [f"order {order} dead-lettered with {w}" for w in wrong if w]
    return [f"order {order} is {job.state} (stuck)"]
