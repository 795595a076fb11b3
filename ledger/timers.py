"""`TimerLedger`: durable timers. A timer is set in the transaction that moves its job to
the waiting step (`StepLedger.record_successes(…, sleep_until=…)`); the timer loop fires the
due ones, each by one compare-and-set in the transaction that moves its job on, leaving the
next step's publish in the outbox (`dispatched_at` NULL) until it is sent. A wait for a
signal has a timer too: its firing is the timeout's side of the race (`ledger.signals`). Must
not import celery, kombu, jobs or config."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from sqlalchemy.engine import Connection, Engine, Row

from ledger import db, queries, wait_outbox
from ledger.dead_letters import DeadLetterNote, write_dead_letter
from ledger.queries import timers as timer_queries
from ledger.schema import timers
from ledger.signals import timeout_result
from ledger.types import ACTIVE_JOB_STATES, JSON, DeadLetterReason, EventKind, JobState, TimerKind
from ledger.wait_outbox import ResendRoute

#: Where `TimerStats.pending` splits the pending timers by due time, in seconds from now
#: (the first bucket holds the overdue ones).
DUE_BUCKETS: Final = (0.0, 60.0, 3600.0, 86400.0)
#: The names of those buckets, and one for the rest.
DUE_NAMES: Final = ("overdue", "within_1m", "within_1h", "within_1d", "later")
#: The most timers one count of `TimerLedger.stats` reads (index entries only): past it the
#: count is this, named in `TimerStats.over_cap`, and costs no more (counting a million
#: pending timers by due time took 1.3 s, walking them all; 10,000 take 2–10 ms).
COUNT_CAP: Final = 10_000
#: The same for the jobs waiting on timers, each looked up (10,000 took 40–85 ms).
WAITING_CAP: Final = 1_000


@dataclass(frozen=True)
class DueTimer:
    """A timer just fired, with what its job's next step depends on."""

    id: int
    job_id: UUID
    pipeline: str
    step: str
    kind: TimerKind
    due_at: datetime
    fired_at: datetime
    context: Mapping[str, JSON]
    results: Mapping[str, JSON]


@dataclass(frozen=True)
class FiredTimer:
    """A fired timer whose job moved on to `next_step`, to publish after the commit."""

    id: int
    job_id: UUID
    pipeline: str
    #: The sleep step it ended, and the step its job moved on to.
    step: str
    next_step: str
    #: Seconds from its due time to its firing.
    late: float
    #: A retry timer or a limit's wait: `next_step` is `step`, sent again (on the retry
    #: queue: a repeat).
    resend: bool = False
    #: A map item's limit wait: the item to send again ("" for a step).
    item_id: str = ""


@dataclass(frozen=True)
class TimerStats:
    """The timers for people: jobs waiting, pending timers by due time, firing lateness."""

    waiting_jobs: int
    #: Pending timers by `DUE_NAMES`.
    pending: dict[str, int]
    #: Timers fired in the window, and the lateness (fired − due) in seconds of the latest
    #: of them (a sample of at most `stats`' `sample`).
    fired: int
    late_p50: float | None
    late_p99: float | None
    late_max: float | None
    #: The counts that stopped at their cap (`COUNT_CAP`, `WAITING_CAP`), more being there:
    #: `waiting_jobs`, `fired`, or a name of `DUE_NAMES`.
    over_cap: frozenset[str] = frozenset()


class TimerLedger:
    """Fires due timers and resends lost firings; usable from plain Python.

    Args:
        engine: where the ledger lives.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine

    def fire_due(
        self,
        *,
        limit: int,
        pipelines: Sequence[str],
        route: Callable[[DueTimer], str | None],
    ) -> list[FiredTimer]:
        """Fire up to `limit` due timers of jobs of `pipelines`, each exactly once: in one
        transaction, claim each (`pending` → `fired`, SKIP LOCKED on Postgres; on SQLite the
        transaction holds the one write lock from its start), move its job from the waiting
        step to `route(timer)` (None: the job ends there) with the wait's times as the step's
        result, and append `woke` to its history — or, for a retry timer, leave the job at
        its step, to send again, and append `retry_due`; for a limit's wait, send its step
        (or map item) again if the job is still there, the job untouched. The moves left to
        publish are returned and stay in the outbox until `mark_sent`; a crash before that
        leaves them to `take_unsent`.

        `route` runs inside the transaction; a `LookupError` from it (the pipeline has no
        such step any more) dead-letters the job at its waiting step, any other error
        fires nothing."""
        fired: list[FiredTimer] = []
        with db.transaction(self.engine) as conn:
            dialect = conn.dialect.name
            rows = list(conn.execute(timer_queries.fire_due(dialect, limit, pipelines)))
            if not rows:
                return []
            found = conn.execute(timer_queries.select_waiting_jobs([r.job_id for r in rows]))
            jobs = {job.id: job for job in found}
            due: list[DueTimer] = []
            nothing_to_send: list[int] = []
            for row in rows:
                job = jobs[row.job_id]
                if row.kind == TimerKind.LIMIT:
                    # The step (or item) waited for its limit: sent again, the job unmoved.
                    if job.state in ACTIVE_JOB_STATES and job.current_step == row.step:
                        fired.append(_again(row, job.pipeline))
                    else:
                        nothing_to_send.append(row.id)
                    continue
                due.append(
                    DueTimer(
                        row.id,
                        row.job_id,
                        job.pipeline,
                        row.step,
                        TimerKind(row.kind),
                        db.as_utc(row.due_at),
                        db.as_utc(row.fired_at),
                        job.context,
                        job.results,
                    )
                )
            if dialect == "postgresql":
                moved, nothing = self._fire_together(conn, due, route)
                fired.extend(moved)
                nothing_to_send.extend(nothing)
            else:
                for timer in due:
                    firing = self._fire(conn, timer, route)
                    if firing is None:
                        nothing_to_send.append(timer.id)
                    else:
                        fired.append(firing)
            if nothing_to_send:
                conn.execute(timer_queries.mark_sent(nothing_to_send))
        return fired

    def _fire_together(
        self, conn: Connection, due: list[DueTimer], route: Callable[[DueTimer], str | None]
    ) -> tuple[list[FiredTimer], list[int]]:
        """`_fire` for a round's timers in a few statements (Postgres): their jobs moved on
        in one, the retries' jobs touched in one, their events in one. What to publish, and
        the timers with nothing to."""
        moves: list[tuple[DueTimer, str | None]] = []
        retries: list[DueTimer] = []
        nothing: list[int] = []
        for timer in due:
            if timer.kind is TimerKind.RETRY:
                retries.append(timer)
                continue
            try:
                moves.append((timer, route(timer)))
            except LookupError as exc:
                self._dead_letter(conn, timer, exc)
                nothing.append(timer.id)
        moved: dict[UUID, str] = {}
        if moves:
            statement, values = timer_queries.move_many_on(
                [(t.job_id, t.step, next_step, _woke(t)[1]) for t, next_step in moves]
            )
            moved = {row.id: row.state for row in conn.execute(statement, values)}
        touched: set[UUID] = set()
        if retries:
            statement, values = timer_queries.touch_many_retrying(
                [(t.job_id, t.step) for t in retries]
            )
            touched = {row.id for row in conn.execute(statement, values)}
        events: list[tuple[UUID, str, EventKind, JSON]] = []
        fired: list[FiredTimer] = []
        for timer, next_step in moves:
            late, woke, kind = _woke(timer)
            state = moved.get(timer.job_id)
            if state is not None:
                events.append((timer.job_id, timer.step, kind, woke))
            if state is None or next_step is None or JobState(state) is not JobState.RUNNING:
                nothing.append(timer.id)
                continue
            fired.append(
                FiredTimer(timer.id, timer.job_id, timer.pipeline, timer.step, next_step, late)
            )
        for timer in retries:
            if timer.job_id not in touched:
                nothing.append(timer.id)
                continue
            late, woke, _ = _woke(timer)
            events.append((timer.job_id, timer.step, EventKind.RETRY_DUE, woke))
            step = timer.step
            fired.append(
                FiredTimer(timer.id, timer.job_id, timer.pipeline, step, step, late, resend=True)
            )
        if events:
            conn.execute(*timer_queries.append_firings(events))
        return fired, nothing

    def _fire(
        self, conn: Connection, timer: DueTimer, route: Callable[[DueTimer], str | None]
    ) -> FiredTimer | None:
        """Move one fired timer's job on (in the caller's transaction); what to publish,
        or None when nothing is."""
        late, woke, kind = _woke(timer)
        job_id, step = timer.job_id, timer.step
        if timer.kind is TimerKind.RETRY:
            touched = conn.execute(timer_queries.touch_retrying(job_id, step)).one_or_none()
            if touched is None:
                # The job moved on (a redelivery ran the step early after all) or stopped.
                return None
            conn.execute(queries.append_event(job_id, step, EventKind.RETRY_DUE, detail=woke))
            return FiredTimer(timer.id, job_id, timer.pipeline, step, step, late, resend=True)
        try:
            next_step = route(timer)
        except LookupError as exc:
            # The pipeline has no such step any more: a person must look (a timer left
            # pending would be taken again every round).
            self._dead_letter(conn, timer, exc)
            return None
        move = queries.move_on_with_result(job_id, step, woke, next_step)
        state: str | None = conn.execute(move).scalar_one_or_none()
        if state is None:
            # The job is no longer at this wait (it never should be): fired, moved nowhere,
            # nothing to publish.
            return None
        conn.execute(queries.append_event(job_id, step, kind, detail=woke))
        if next_step is None or JobState(state) is not JobState.RUNNING:
            return None
        return FiredTimer(timer.id, job_id, timer.pipeline, step, next_step, late)

    @staticmethod
    def _dead_letter(conn: Connection, timer: DueTimer, exc: LookupError) -> None:
        error: JSON = {"type": type(exc).__name__, "message": str(exc), "retryable": False}
        letter = DeadLetterNote(timer.job_id, timer.step, None, error, DeadLetterReason.PERMANENT)
        write_dead_letter(conn, letter, 0, None)

    def mark_sent(self, timer_ids: Sequence[int]) -> None:
        """Note that fired timers' next steps reached the broker."""
        if timer_ids:
            with db.single_statement(self.engine) as conn:
                conn.execute(timer_queries.mark_sent(timer_ids))

    def undo_sent(self, timer_ids: Sequence[int]) -> None:
        """Put fired timers back in the outbox (their resend failed)."""
        wait_outbox.undo_sent(self.engine, timers, timer_ids)

    def take_unsent(
        self, *, older_than: float, limit: int, pipelines: Sequence[str], route: ResendRoute
    ) -> list[tuple[int, UUID, str, str, str]]:
        """Take fired timers whose publish was not confirmed for `older_than` seconds,
        marked sent from now on (`undo_sent` if the send fails): (timer id, job id, pipeline,
        step to send, map item to send or "") for each whose job is still active at the step
        the firing sent (`route`, see `wait_outbox.take_unsent`); the others are simply
        taken."""
        dialect = self.engine.dialect.name
        take = timer_queries.take_unsent(dialect, older_than, limit, pipelines)
        return wait_outbox.take_unsent(self.engine, take, route)

    def stats(
        self,
        *,
        window: float = 300.0,
        sample: int = 10_000,
        cap: int = COUNT_CAP,
        waiting_cap: int = WAITING_CAP,
    ) -> TimerStats:
        """Jobs waiting on timers, pending timers by due time, timers fired in the last
        `window` seconds and the lateness of the latest `sample` of them; each count read
        from an index no further than its cap (`cap`, `waiting_cap` for the jobs), however
        many timers there are."""
        caps = {"waiting_jobs": waiting_cap}
        with db.transaction(self.engine) as conn:
            counts: dict[str, int] = {
                "waiting_jobs": conn.execute(
                    timer_queries.count_waiting_jobs(waiting_cap)
                ).scalar_one(),
                "fired": conn.execute(timer_queries.count_fired_since(window, cap)).scalar_one(),
            }
            by_due = conn.execute(timer_queries.pending_by_due(DUE_BUCKETS, cap)).one()
            counts.update(zip(DUE_NAMES, (int(each) for each in by_due), strict=True))
            rows = conn.execute(timer_queries.recent_lateness(window, sample))
            late = sorted(max(0.0, float(row.late)) for row in rows)
        over = frozenset(name for name, count in counts.items() if count > caps.get(name, cap))
        capped = {name: min(count, caps.get(name, cap)) for name, count in counts.items()}
        return TimerStats(
            waiting_jobs=capped["waiting_jobs"],
            pending={name: capped[name] for name in DUE_NAMES},
            fired=capped["fired"],
            late_p50=_quantile(late, 0.50),
            late_p99=_quantile(late, 0.99),
            late_max=late[-1] if late else None,
            over_cap=over,
        )


def _again(row: Row[Any], pipeline: str) -> FiredTimer:
    """A fired limit timer: its step (or map item) to send again."""
    late = max(0.0, (db.as_utc(row.fired_at) - db.as_utc(row.due_at)).total_seconds())
    step, item_id = row.step, row.item_id
    return FiredTimer(row.id, row.job_id, pipeline, step, step, late, True, item_id)


def _woke(timer: DueTimer) -> tuple[float, JSON, EventKind]:
    """A fired timer's lateness in seconds, its wait's result (a sleep's times; a wait for
    a signal whose timeout won says so), and the event that tells it."""
    late = max(0.0, (timer.fired_at - timer.due_at).total_seconds())
    if timer.kind is TimerKind.SIGNAL_TIMEOUT:
        return late, timeout_result(timer.due_at, timer.fired_at), EventKind.TIMED_OUT
    woke: JSON = {
        "due_at": timer.due_at.isoformat(),
        "fired_at": timer.fired_at.isoformat(),
        "late_ms": round(late * 1000, 1),
    }
    return late, woke, EventKind.WOKE


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
