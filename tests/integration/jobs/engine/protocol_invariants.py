"""The invariants the protocol's model-based test checks (DESIGN.md, "Invariants", adapted
to a run whose messages may still be in flight), computed from the provider's effects and
the job rows, the ledger's rows being what they are checked against: after every rule
(`check_always`), after the first drain, in which no time passes (`check_progress`), and at
quiescence (`check_quiescent`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ledger import JSON, DeadLetterState, EventKind, JobState, StepState, db
from ledger.schema import dead_letters, jobs, ledger_entries, metadata, step_events
from tests.integration.jobs.engine.protocol_world import Effect, Message, order_amount

_ACTIVE = (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class JobRow:
    id: str
    pipeline: str
    event_id: str
    state: JobState
    context: dict[str, JSON]
    step_keys: dict[str, str]
    results: dict[str, JSON]
    current_step: str | None


@dataclass(frozen=True)
class EntryRow:
    key: str
    job_id: str
    step: str
    state: StepState


@dataclass(frozen=True)
class Snapshot:
    """The rows of the ledger's tables, as they stand between two rules."""

    jobs: dict[str, JobRow]
    entries: dict[str, EntryRow]
    #: Events by (job id, step, kind).
    events: Counter[tuple[str, str, str]]
    open_letters: Counter[str]

    def listing(self, key: str | None) -> list[JobRow]:
        """The jobs whose plan lists `key`."""
        return [job for job in self.jobs.values() if key in job.step_keys.values()]


@dataclass
class Memory:
    """What the test remembers across rules (rows may be pruned; contexts never change)."""

    contexts: dict[str, dict[str, JSON]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    job_keys: dict[str, set[str]] = field(default_factory=dict)
    #: Keys a person settled as succeeded (`resolve`): their entry names whichever job
    #: claimed them last, which may not be the job whose dead letter was settled.
    settled_keys: set[str] = field(default_factory=set)
    #: Keys a killed run may have held when it died (its jobs' keys).
    killed_keys: set[str] = field(default_factory=set)
    #: By job: deliveries that may have noted a duplicate in its history (answered duplicate,
    #: killed, or interrupted).
    absorbed: Counter[str] = field(default_factory=Counter)

    #: Orders (pipeline, order id) that had jobs, and those whose every job was pruned.
    orders: set[tuple[str, str]] = field(default_factory=set)
    retired: set[tuple[str, str]] = field(default_factory=set)
    #: By job: its (pipeline, event id).
    events: dict[str, tuple[str, str]] = field(default_factory=dict)

    def remember(self, snapshot: Snapshot) -> None:
        for job in snapshot.jobs.values():
            self.contexts.setdefault(job.id, job.context)
            self.orders.add((job.pipeline, str(job.context["order_id"])))
            self.events[job.id] = (job.pipeline, job.event_id)
            self.keys.update(job.step_keys.values())
            self.job_keys[job.id] = set(job.step_keys.values())

    def retire(self, snapshot: Snapshot) -> None:
        """After a prune: the orders none of whose jobs is left."""
        left = {(job.pipeline, str(job.context["order_id"])) for job in snapshot.jobs.values()}
        self.retired |= self.orders - left

    def identity(self, message: Message) -> tuple[str, str, str]:
        """An order of messages that does not depend on job ids or clocks."""
        return (*self.events.get(message.job_id, ("", "")), message.step)


class Database:
    """The test's database: emptied per example, read per rule, and its clock for leases."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def reset(self) -> None:
        """Delete every row (each example starts empty; the schema stays)."""
        with self.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(sa.delete(table))

    def expire_leases(self) -> None:
        """Time passes: every started key's lease has run out. (Moves `locked_until` into the
        past rather than waiting for it.)"""
        with self.engine.begin() as conn:
            past = db.utcnow_plus(db.seconds(-1.0))
            started = ledger_entries.c.state == str(StepState.STARTED)
            conn.execute(sa.update(ledger_entries).where(started).values(locked_until=past))

    def snapshot(self) -> Snapshot:
        with self.engine.connect() as conn:
            # In an order that does not depend on the clock (rules pick jobs by place).
            ordered = sa.select(jobs).order_by(jobs.c.pipeline, jobs.c.event_id)
            job_rows = conn.execute(ordered).mappings().all()
            entry_rows = conn.execute(sa.select(ledger_entries)).mappings().all()
            by_kind = (step_events.c.job_id, step_events.c.step, step_events.c.kind)
            counted = conn.execute(sa.select(*by_kind, sa.func.count()).group_by(*by_kind)).all()
            opened = dead_letters.c.state == str(DeadLetterState.OPEN)
            letters = conn.execute(sa.select(dead_letters.c.job_id).where(opened)).all()
        return Snapshot(
            jobs={str(row["id"]): _job(row) for row in job_rows},
            entries={
                row["key"]: EntryRow(
                    row["key"], str(row["job_id"]), row["step"], StepState(row["state"])
                )
                for row in entry_rows
            },
            events=Counter(
                {(str(row[0]), str(row[1]), str(row[2])): int(row[3]) for row in counted}
            ),
            open_letters=Counter(str(row.job_id) for row in letters),
        )


def _job(row: Any) -> JobRow:
    return JobRow(
        id=str(row["id"]),
        pipeline=row["pipeline"],
        event_id=row["event_id"],
        state=JobState(row["state"]),
        context=row["context"],
        step_keys=row["step_keys"],
        results=row["results"],
        current_step=row["current_step"],
    )


Check = Callable[[Snapshot, Sequence[Effect], Memory], None]


def check_always(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """What holds after every rule, messages in flight or not (each of `ALWAYS`)."""
    for check in ALWAYS:
        check(snapshot, effects, memory)


def at_most_one_effect_per_order(
    snapshot: Snapshot, effects: Sequence[Effect], memory: Memory
) -> None:
    """Charges per order ≤ 1, notifications per order ≤ 1 (invariant 2)."""
    per_order = Counter((e.pipeline, e.kind, e.order_id) for e in effects)
    for (pipeline, kind, order_id), count in per_order.items():
        assert count <= 1, f"{count} {kind}s for order {order_id} of {pipeline}"


def charges_are_what_orders_say(
    snapshot: Snapshot, effects: Sequence[Effect], memory: Memory
) -> None:
    """Every charge's order and amount are those of its job's row; no effect under a key
    no job listed (invariant 5)."""
    for effect in effects:
        assert effect.key in memory.keys, f"{effect} under a key no job ever listed"
        if effect.kind != "charge":
            continue
        assert effect.job_id is not None, f"{effect} made outside a step"
        context = memory.contexts[effect.job_id]
        expected = (context["order_id"], order_amount(context))
        assert (effect.order_id, effect.amount) == expected, (
            f"{effect}: the order of job {effect.job_id} is {expected[0]} for {expected[1]}"
        )


def effects_keep_their_keys(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """Invariant (3), every effect maps to a ledger key that is succeeded or unknown, as it
    holds with messages in flight: while a job that lists the key can still run or be
    replayed, the key is there."""
    for effect in effects:
        listing = snapshot.listing(effect.key)
        if any(job.state in (*_ACTIVE, JobState.DEAD_LETTERED) for job in listing):
            assert effect.key in snapshot.entries, (
                f"{effect}: jobs {_states(listing)} list its key, and the ledger has no entry"
            )


def applied_keys_are_not_failed(
    snapshot: Snapshot, effects: Sequence[Effect], memory: Memory
) -> None:
    """Invariant (3), continued: an applied key may be `failed` only while a retry can still
    come (a job listing it active, or cancelled); else a replay acts again."""
    for effect in effects:
        listing = snapshot.listing(effect.key)
        entry = snapshot.entries.get(effect.key or "")
        if entry is not None and entry.state is StepState.FAILED and listing:
            assert any(job.state in (*_ACTIVE, JobState.CANCELLED) for job in listing), (
                f"{effect}: its key is `failed` (a replay acts again), jobs {_states(listing)}"
            )


def one_success_per_step(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """A job's history says a step succeeded at most once."""
    for (job_id, step, kind), count in snapshot.events.items():
        if kind == EventKind.SUCCEEDED:
            assert count == 1, f"job {job_id}: {count} `succeeded` events for {step}"


def one_note_per_duplicate(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """A job's history notes a duplicate at most once per run that absorbed one."""
    noted: Counter[str] = Counter()
    for (job_id, _, kind), count in snapshot.events.items():
        if kind in (EventKind.DUPLICATE, EventKind.DEDUPLICATED):
            noted[job_id] += count
    for job_id, count in noted.items():
        allowed = memory.absorbed[job_id]
        assert count <= allowed, f"job {job_id}: {count} duplicate notes for {allowed} deliveries"


def dead_letters_match_jobs(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """A dead-lettered job has one open dead letter; any other job none (invariant 1)."""
    for job in snapshot.jobs.values():
        letters = snapshot.open_letters[job.id]
        expected = 1 if job.state is JobState.DEAD_LETTERED else 0
        assert letters == expected, f"job {job.id} is {job.state} with {letters} open dead letters"


def results_follow_records(snapshot: Snapshot, effects: Sequence[Effect], memory: Memory) -> None:
    """A job's results hold every step its own keys recorded as succeeded (a cancelled
    job's too, on either path). Its own: its history says it recorded the step (a key that
    `prune` handed over from a twin is held by the job, not recorded by it)."""
    for job in snapshot.jobs.values():
        for step, key in job.step_keys.items():
            entry = snapshot.entries.get(key)
            if key in memory.settled_keys or entry is None or entry.job_id != job.id:
                continue
            if not snapshot.events[(job.id, step, str(EventKind.SUCCEEDED))]:
                continue
            if entry.state is StepState.SUCCEEDED:
                assert step in job.results, (
                    f"job {job.id} ({job.state}): its key {key} succeeded, its results lack {step}"
                )


def started_keys_have_an_owner(
    snapshot: Snapshot, effects: Sequence[Effect], memory: Memory
) -> None:
    """Between rules no run goes on: a key still `started` was left by a worker that died
    (or a batch interrupted) while holding it, never by one that lives on — such a key would
    hold its job up for a whole lease (class 8: a commit whose answer was lost)."""
    for entry in snapshot.entries.values():
        if entry.state is StepState.STARTED:
            assert entry.key in memory.killed_keys, (
                f"key {entry.key} (job {entry.job_id}) is held by no worker that died"
            )


#: The invariants after every rule.
ALWAYS: list[Check] = [
    started_keys_have_an_owner,
    at_most_one_effect_per_order,
    charges_are_what_orders_say,
    effects_keep_their_keys,
    applied_keys_are_not_failed,
    one_success_per_step,
    one_note_per_duplicate,
    dead_letters_match_jobs,
    results_follow_records,
]


def check_progress(snapshot: Snapshot, memory: Memory) -> None:
    """After delivering every message with no time passing: a job still unfinished waits
    for a key that a killed worker may hold (its lease must run out), never for another."""
    for job in snapshot.jobs.values():
        if job.state not in _ACTIVE:
            continue
        key = job.step_keys.get(job.current_step or "")
        entry = snapshot.entries.get(key or "")
        assert key in memory.killed_keys, (
            f"job {job.id} stalled at {job.current_step}: key {key} is {entry and entry.state}"
            f" (job {entry and entry.job_id}), though no worker holding it died"
        )


def check_quiescent(snapshot: Snapshot, effects: Sequence[Effect]) -> None:
    """Once everything was delivered and every lease ran out."""
    for job in snapshot.jobs.values():
        assert job.state not in _ACTIVE, f"job {job.id} stuck {job.state} at {job.current_step}"
        if job.state is not JobState.SUCCEEDED:
            continue
        order = (job.pipeline, job.context["order_id"])
        for kind in ("charge", "notification"):
            count = sum(1 for e in effects if (e.pipeline, e.order_id, e.kind) == (*order, kind))
            assert count == 1, f"job {job.id} succeeded with {count} {kind}s"
    for effect in effects:
        listing = snapshot.listing(effect.key)
        if not listing or any(job.state is JobState.CANCELLED for job in listing):
            continue
        entry = snapshot.entries.get(effect.key or "")
        state = entry.state if entry is not None else None
        assert state in (StepState.SUCCEEDED, StepState.UNKNOWN), (
            f"{effect}: its key is {state} once quiescent, jobs {_states(listing)}"
        )


def _states(listing: Sequence[JobRow]) -> str:
    return ", ".join(f"{job.id[:8]} {job.state}" for job in listing)
