"""The signals' statements: record a signal once per id, find the oldest kept one of a name
and key, find the oldest wait for one, end that wait (the compare-and-set on its timer), and
the outbox of the step a signal moved its job on to."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from ledger import db
from ledger.queries import wait_outbox
from ledger.queries.common import ACTIVE, json_value
from ledger.schema import jobs, signals, timers
from ledger.types import JSON, TimerKind, TimerState

_PENDING = str(TimerState.PENDING)


def insert_signal(
    dialect_name: str, name: str, key: str, signal_id: str, data: JSON, fingerprint: str
) -> Any:
    """Record a signal; nothing if its id was recorded before (then no row comes back).
    Returns its row id and time."""
    insert = db.insert_for(dialect_name)(signals).values(
        name=name,
        key=key,
        signal_id=signal_id,
        data=json_value(data) if data is not None else sa.null(),
        fingerprint=fingerprint,
        received_at=db.utcnow(),
    )
    conflict = insert.on_conflict_do_nothing(index_elements=["name", "signal_id"])
    return conflict.returning(signals.c.id, signals.c.received_at)


def select_signal(name: str, signal_id: str) -> sa.Select[Any]:
    """A recorded signal, by name and id."""
    return sa.select(signals).where(signals.c.name == name, signals.c.signal_id == signal_id)


def lock_name_and_key(name: str, key: str) -> sa.Select[Any]:
    """Postgres: a lock, held to the end of the transaction, on one signal name and key.
    A signal's arrival and a job's arrival at a wait for it take it first, so that each sees
    what the other committed: without it both could commit unseen by the other (the signal
    kept, the job waiting for it until its timeout). SQLite's one writer needs none."""
    digest = hashlib.sha256(f"oncelery.signal\x00{name}\x00{key}".encode()).digest()
    lock_id = int.from_bytes(digest[:8], "big", signed=True)
    return sa.select(sa.func.pg_advisory_xact_lock(lock_id))


def _kept_since(keep_for: float) -> sa.ColumnElement[bool]:
    """A signal no wait has taken, received within its lifetime (`keep_for` seconds)."""
    return sa.and_(
        signals.c.consumed_at.is_(None),
        signals.c.received_at > db.utcnow_plus(db.seconds(-keep_for)),
    )


def oldest_kept(name: str, key: str, keep_for: float) -> sa.Select[Any]:
    """The oldest signal of a name and key no wait has taken, received within `keep_for`
    seconds (an older one is expired: no wait takes it)."""
    return (
        sa.select(signals.c.id, signals.c.signal_id, signals.c.data, signals.c.received_at)
        .where(signals.c.name == name, signals.c.key == key, _kept_since(keep_for))
        .order_by(signals.c.id)
        .limit(1)
    )


def consume(signal_row: int, job_id: UUID, step: str) -> sa.Update:
    """A wait takes a kept signal (only if still kept); returns when."""
    return (
        sa.update(signals)
        .where(signals.c.id == signal_row, signals.c.consumed_at.is_(None))
        .values(job_id=job_id, step=step, consumed_at=db.utcnow())
        .returning(signals.c.consumed_at)
    )


def oldest_wait(name: str, key: str, passed: Sequence[int]) -> sa.Select[Any]:
    """The oldest pending wait for a signal name and key of an active job at its waiting
    step (but for the timers in `passed`): the timer and what moving its job on needs."""
    query = (
        sa.select(
            timers.c.id,
            timers.c.job_id,
            timers.c.step,
            timers.c.due_at,
            jobs.c.pipeline,
        )
        .join(jobs, jobs.c.id == timers.c.job_id)
        .where(
            timers.c.signal == name,
            timers.c.signal_key == key,
            timers.c.state == _PENDING,
            jobs.c.state.in_(ACTIVE),
            jobs.c.current_step == timers.c.step,
        )
        .order_by(timers.c.id)
        .limit(1)
    )
    if passed:
        query = query.where(timers.c.id.not_in(list(passed)))
    return query


def end_wait(timer_id: int) -> sa.Update:
    """The compare-and-set that decides a wait for its signal: `pending` → `cancelled` only if
    the timer has not fired (the timer loop's `pending` → `fired` is the other side); returns
    the row when this side won."""
    return (
        sa.update(timers)
        .where(timers.c.id == timer_id, timers.c.state == _PENDING)
        .values(state=str(TimerState.CANCELLED))
        .returning(timers.c.id)
    )


def mark_sent(job_ids: Sequence[UUID], step: str) -> sa.Update:
    """Note that the next step after the signal that moved these jobs on from `step` reached
    the broker (the signals leave the outbox)."""
    return (
        sa.update(signals)
        .where(
            signals.c.job_id.in_(list(job_ids)),
            signals.c.step == step,
            signals.c.consumed_at.is_not(None),
            signals.c.dispatched_at.is_(None),
        )
        .values(dispatched_at=db.utcnow())
    )


def mark_rows_sent(signal_rows: Sequence[int]) -> sa.Update:
    """Note that the next steps after these signals reached the broker."""
    return (
        sa.update(signals)
        .where(signals.c.id.in_(list(signal_rows)), signals.c.dispatched_at.is_(None))
        .values(dispatched_at=db.utcnow())
    )


def take_unsent(
    dialect_name: str, older_than: float, limit: int, pipelines: Sequence[str]
) -> sa.Update:
    """Take signals whose job (of `pipelines`) had its next step not known to reach the broker
    for `older_than` seconds after they moved it on (the sender died between its commit and
    the publish), marking them sent (see `wait_outbox.take_unsent`)."""
    return wait_outbox.take_unsent(
        dialect_name,
        signals,
        moved_at=signals.c.consumed_at,
        unsent=sa.and_(signals.c.consumed_at.is_not(None), signals.c.dispatched_at.is_(None)),
        again=sa.false(),
        older_than=older_than,
        limit=limit,
        pipelines=pipelines,
    )


def count_kept(
    keep_for: float, name: str | None = None, keys: Sequence[str] | None = None
) -> sa.Select[Any]:
    """Signals a wait may still take (kept, not expired): all, or those of `name` for `keys`."""
    query = sa.select(sa.func.count()).where(_kept_since(keep_for))
    if name is not None:
        query = query.where(signals.c.name == name)
    if keys is not None:
        query = query.where(signals.c.key.in_(list(keys)))
    return query


def count_expired(keep_for: float) -> sa.Select[Any]:
    """Signals kept longer than `keep_for` seconds: no wait takes them, `prune` deletes them."""
    return sa.select(sa.func.count()).where(
        signals.c.consumed_at.is_(None),
        signals.c.received_at <= db.utcnow_plus(db.seconds(-keep_for)),
    )


def _prunable(keep_for: float, older_than: float) -> sa.ColumnElement[bool]:
    """Kept past its lifetime (`keep_for`), or taken more than `older_than` seconds ago by a
    wait whose next step's publish is settled (sent, or its job no longer active)."""
    active = sa.exists().where(jobs.c.id == signals.c.job_id, jobs.c.state.in_(ACTIVE))
    expired = sa.and_(
        signals.c.consumed_at.is_(None),
        signals.c.received_at <= db.utcnow_plus(db.seconds(-keep_for)),
    )
    consumed = sa.and_(
        signals.c.consumed_at.is_not(None),
        signals.c.consumed_at < db.utcnow_plus(db.seconds(-older_than)),
        sa.or_(signals.c.dispatched_at.is_not(None), ~active),
    )
    return sa.or_(expired, consumed)


def select_prunable(
    dialect_name: str, keep_for: float, older_than: float, limit: int
) -> sa.Select[Any]:
    """A batch of signals to delete (see `_prunable`), oldest first, locked: rows another
    pruner holds are skipped."""
    batch = (
        sa.select(signals.c.id)
        .where(_prunable(keep_for, older_than))
        .order_by(signals.c.id)
        .limit(limit)
    )
    return db.for_update_skip_locked(batch, dialect_name)


def delete_signals(signal_rows: Sequence[int], keep_for: float, older_than: float) -> sa.Delete:
    """Delete those of these signals still prunable."""
    return sa.delete(signals).where(
        signals.c.id.in_(list(signal_rows)), _prunable(keep_for, older_than)
    )


def count_waiting_for_signals() -> sa.Select[Any]:
    """Active jobs waiting for a signal."""
    return sa.select(sa.func.count(sa.distinct(timers.c.job_id))).where(
        timers.c.state == _PENDING,
        timers.c.kind == str(TimerKind.SIGNAL_TIMEOUT),
        sa.exists().where(jobs.c.id == timers.c.job_id, jobs.c.state.in_(ACTIVE)),
    )
