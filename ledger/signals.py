"""`SignalLedger`: signals as rows. A signal is recorded once per (name, signal id); if a job
waits for its name and key, it ends that wait — one compare-and-set on the wait's timer, the
timer loop's firing being the other side — and moves the job on in the same transaction;
else it is kept for the first wait that comes (`take_kept`, in the transaction that moves a
job to its wait). Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from sqlalchemy.engine import Connection, Engine

from ledger import db, queries, wait_outbox
from ledger.errors import LedgerError
from ledger.queries import signals as signal_queries
from ledger.schema import signals
from ledger.types import JSON, EventKind, JobState, SignalWait
from ledger.wait_outbox import ResendRoute

#: Seconds a signal no wait has taken stays takeable, unless told (`ONCELERY_SIGNAL_KEEP_FOR`).
KEEP_FOR: Final = 7 * 86_400.0


class SignalOutcome(enum.StrEnum):
    """What sending a signal did."""

    #: The signal is new: it ended a wait, or is kept for the first one.
    RECORDED = "recorded"
    #: Its id was recorded before with the same key and data: nothing changed.
    DUPLICATE = "duplicate"


class SignalConflict(LedgerError):
    """Raised when a signal id comes again with another key or other data: the same id must
    mean the same signal, so nothing is written."""

    def __init__(self, name: str, signal_id: str) -> None:
        self.name = name
        self.signal_id = signal_id
        super().__init__(
            f"signal {name!r} with id {signal_id!r} was recorded before with another key or "
            "other data; nothing was written"
        )


@dataclass(frozen=True)
class NewSignal:
    """A signal to send: for the jobs waiting for `name` with `key`."""

    name: str
    key: str
    signal_id: str
    data: JSON = None

    @property
    def fingerprint(self) -> str:
        """Of its content (key and data), to tell a duplicate from a conflict."""
        canonical = json.dumps([self.key, self.data], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class WokenJob:
    """A job a signal moved on past its wait, to publish its `next_step` after the commit
    (None: the wait was its last step, nothing to publish)."""

    signal_row: int
    job_id: UUID
    pipeline: str
    step: str
    next_step: str | None
    job_state: JobState


@dataclass(frozen=True)
class SignalSent:
    """A signal's outcome, and the job it moved on, if one waited for it."""

    outcome: SignalOutcome
    woke: WokenJob | None = None


#: The step a wait of a pipeline moves its job on to (None: it was the last); raises
#: `LookupError` when the pipeline has no such step (the wait is left to its timer, which
#: dead-letters the job); anything else it raises ends the send, nothing written.
Route = Callable[[str, str], str | None]


class _WaitMoved(Exception):
    """The wait's compare-and-set held, but its job was not at the wait (dead-lettered there
    by a stray message, say): the attempt is rolled back and that wait passed over."""

    def __init__(self, timer_id: int) -> None:
        self.timer_id = timer_id
        super().__init__(timer_id)


class SignalLedger:
    """Records signals and ends the waits they are for; usable from plain Python.

    Args:
        engine: where the ledger lives.
        unavailable_for: how long a call keeps retrying while the database is unreachable.
        keep_for: seconds a signal no wait has taken stays takeable (then it is expired).
    """

    def __init__(
        self, *, engine: Engine, unavailable_for: float = 15.0, keep_for: float = KEEP_FOR
    ) -> None:
        self.engine = engine
        self.unavailable_for = unavailable_for
        self.keep_for = keep_for

    def send(self, signal: NewSignal, *, route: Route) -> SignalSent:
        """Record a signal, and end the oldest wait for its name and key, if there is one,
        all in one transaction: the wait's timer goes `pending`
        → `cancelled` only if still pending (a timer the loop fired first keeps its firing,
        and the signal is kept), the signal is taken by the job, and the job moves on to
        `route(pipeline, step)` with the wait's result (`by`: signal) and a `signalled`
        event. The next step's publish is then the caller's, after the commit (`mark_sent`);
        the row stays in the outbox until then (`take_unsent`).

        A duplicate id changes nothing. Retried after an ambiguous commit, a send may say
        duplicate of its own signal; a job it moved on is then published by `take_unsent`.

        Raises:
            SignalConflict: the id was recorded before with another key or other data.
        """
        passed: list[int] = []
        while True:
            try:
                return db.retry_while_unavailable(
                    lambda: self._send(signal, route, passed),
                    for_seconds=self.unavailable_for,
                )
            except _WaitMoved as moved:
                passed.append(moved.timer_id)

    def _send(self, signal: NewSignal, route: Route, passed: list[int]) -> SignalSent:
        with db.transaction(self.engine) as conn:
            dialect = conn.dialect.name
            if dialect == "postgresql":
                conn.execute(signal_queries.lock_name_and_key(signal.name, signal.key))
            insert = signal_queries.insert_signal(
                dialect, signal.name, signal.key, signal.signal_id, signal.data, signal.fingerprint
            )
            row = conn.execute(insert).one_or_none()
            if row is None:
                found = conn.execute(signal_queries.select_signal(signal.name, signal.signal_id))
                if not _same_signal(found.one(), signal):
                    raise SignalConflict(signal.name, signal.signal_id)
                return SignalSent(SignalOutcome.DUPLICATE)
            woke = self._end_a_wait(conn, signal, row, route, passed)
            return SignalSent(SignalOutcome.RECORDED, woke)

    @staticmethod
    def _end_a_wait(
        conn: Connection,
        signal: NewSignal,
        row: Any,
        route: Route,
        passed: list[int],
    ) -> WokenJob | None:
        """End the oldest wait for the signal that is still pending; None if none is."""
        while True:
            find = signal_queries.oldest_wait(signal.name, signal.key, passed)
            waiting = conn.execute(find).one_or_none()
            if waiting is None:
                return None
            try:
                next_step = route(waiting.pipeline, waiting.step)
            except LookupError:
                passed.append(waiting.id)  # its timer dead-letters the job when it fires
                continue
            if conn.execute(signal_queries.end_wait(waiting.id)).one_or_none() is None:
                # The timer loop fired it since the look: the timeout won that wait.
                passed.append(waiting.id)
                continue
            consumed = signal_queries.consume(row.id, waiting.job_id, waiting.step)
            consumed_at: datetime = conn.execute(consumed).scalar_one()
            result = signal_result(signal.signal_id, signal.data, row.received_at, consumed_at)
            result["due_at"] = db.as_utc(waiting.due_at).isoformat()
            state = _move_on(conn, waiting.job_id, waiting.step, result, next_step)
            if state is None:
                raise _WaitMoved(waiting.id)
            if next_step is None or state is not JobState.RUNNING:
                conn.execute(signal_queries.mark_rows_sent([row.id]))
            return WokenJob(
                row.id, waiting.job_id, waiting.pipeline, waiting.step, next_step, state
            )

    def mark_sent(self, job_ids: Sequence[UUID], step: str) -> None:
        """Note that the next step of jobs a signal moved on from wait `step` reached the
        broker."""
        if job_ids:
            with db.single_statement(self.engine) as conn:
                conn.execute(signal_queries.mark_sent(job_ids, step))

    def undo_sent(self, signal_rows: Sequence[int]) -> None:
        """Put signals back in the outbox (the resend of their job's next step failed)."""
        wait_outbox.undo_sent(self.engine, signals, signal_rows)

    def take_unsent(
        self, *, older_than: float, limit: int, pipelines: Sequence[str], route: ResendRoute
    ) -> list[tuple[int, UUID, str, str, str]]:
        """Take signals whose job (of `pipelines`) had its next step not confirmed sent for
        `older_than` seconds, marked sent from now on (`undo_sent` if the send fails): (signal
        row, job id, pipeline, step to send, "": no map item) for each whose job is still
        active at the step the signal moved it on to (`route`, see `wait_outbox.take_unsent`)."""
        dialect = self.engine.dialect.name
        take = signal_queries.take_unsent(dialect, older_than, limit, pipelines)
        return wait_outbox.take_unsent(self.engine, take, route)

    def kept(self, name: str, keys: Sequence[str]) -> int:
        """How many signals of `name` for `keys` a wait may still take."""
        with db.transaction(self.engine) as conn:
            count = signal_queries.count_kept(self.keep_for, name, keys)
            return int(conn.execute(count).scalar_one())

    def counts(self) -> tuple[int, int]:
        """(signals kept for a wait to come, not expired; active jobs waiting for a signal)."""
        with db.transaction(self.engine) as conn:
            kept = int(conn.execute(signal_queries.count_kept(self.keep_for)).scalar_one())
            waiting = int(conn.execute(signal_queries.count_waiting_for_signals()).scalar_one())
        return kept, waiting

    def expired(self) -> int:
        """Signals kept past `keep_for`: no wait takes them; `prune` deletes them."""
        with db.transaction(self.engine) as conn:
            return int(conn.execute(signal_queries.count_expired(self.keep_for)).scalar_one())

    def prune(self, *, older_than: float, batch: int = 1000) -> int:
        """Delete, `batch` a transaction, the signals kept past `keep_for` and those a wait
        took more than `older_than` seconds ago (once its next step's publish is settled);
        how many. A pruned signal's id is forgotten: sent again, it is a new signal."""
        deleted = 0
        while True:
            with db.transaction(self.engine) as conn:
                dialect = conn.dialect.name
                chosen = signal_queries.select_prunable(dialect, self.keep_for, older_than, batch)
                rows: list[int] = list(conn.execute(chosen).scalars())
                if rows:
                    delete = signal_queries.delete_signals(rows, self.keep_for, older_than)
                    deleted += conn.execute(delete).rowcount
            if len(rows) < batch:
                return deleted


def take_kept(
    conn: Connection, job_id: UUID, step: str, wait: SignalWait, keep_for: float
) -> tuple[JobState, JSON] | None:
    """Inside the transaction that moves a job to wait `step`: take the oldest signal kept
    for the wait's name and key, received within `keep_for` seconds, if any, and move the
    job on past the wait with the wait's result (`by`: signal). Returns the job's state then
    and the result; None when no signal was kept (the caller sets the wait's timer)."""
    if conn.dialect.name == "postgresql":
        conn.execute(signal_queries.lock_name_and_key(wait.signal, wait.key))
    oldest = signal_queries.oldest_kept(wait.signal, wait.key, keep_for)
    kept = conn.execute(oldest).one_or_none()
    if kept is None:
        return None
    consumed_at: datetime | None = conn.execute(
        signal_queries.consume(kept.id, job_id, step)
    ).scalar_one_or_none()
    if consumed_at is None:  # cannot happen under the lock (or SQLite's one writer)
        return None
    result = signal_result(kept.signal_id, kept.data, kept.received_at, consumed_at)
    waiting: JSON = {"signal": wait.signal, "key": wait.key, "until": None}
    conn.execute(queries.append_event(job_id, step, EventKind.WAITING, detail=waiting))
    state = _move_on(conn, job_id, step, result, wait.then)
    if state is None:
        # The caller moved the job to the wait in this very transaction.
        raise LedgerError(f"job {job_id} left wait {step!r} in the transaction that took it there")
    if wait.then is None or state is not JobState.RUNNING:
        conn.execute(signal_queries.mark_rows_sent([kept.id]))
    return state, result


def _same_signal(recorded: Any, signal: NewSignal) -> bool:
    """Whether a recorded signal has `signal`'s key and data: by fingerprint, or else by
    value, a number equal to another whatever its spelling (`1` and `1.0` are one JSON
    number; the fingerprint, of the text, tells them apart)."""
    if recorded.fingerprint == signal.fingerprint:
        return True
    return bool(recorded.key == signal.key and same_json(recorded.data, signal.data))


def same_json(left: JSON, right: JSON) -> bool:
    """Whether two JSON values are equal as JSON: numbers by value (`1` is `1.0`), `true`
    and `false` never numbers (as Python's `True == 1` would have it), objects whatever the
    order of their keys."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return type(left) is type(right) and left == right


def _move_on(
    conn: Connection, job_id: UUID, step: str, result: dict[str, JSON], next_step: str | None
) -> JobState | None:
    """Move a job still at wait `step` on, with the wait's result and a `signalled` event."""
    move = queries.move_on_with_result(job_id, step, result, next_step)
    state: str | None = conn.execute(move).scalar_one_or_none()
    if state is None:
        return None
    conn.execute(queries.append_event(job_id, step, EventKind.SIGNALLED, detail=result))
    return JobState(state)


def signal_result(
    signal_id: str, data: JSON, received_at: datetime, consumed_at: datetime
) -> dict[str, JSON]:
    """A wait's result when its signal won: which signal, its data, when it was received and
    when it ended the wait (`at`)."""
    return {
        "by": "signal",
        "signal_id": signal_id,
        "data": data,
        "at": db.as_utc(consumed_at).isoformat(),
        "received_at": db.as_utc(received_at).isoformat(),
        "due_at": None,
    }


def timeout_result(due_at: datetime, fired_at: datetime) -> dict[str, JSON]:
    """A wait's result when its timeout won: no signal, the time it fired (`at`)."""
    late = max(0.0, (fired_at - due_at).total_seconds())
    return {
        "by": "timeout",
        "signal_id": None,
        "data": None,
        "at": fired_at.isoformat(),
        "due_at": due_at.isoformat(),
        "late_ms": round(late * 1000, 1),
    }
