"""A limit's statements: take a rate limit's token (GCRA: one conditional upsert of the key's
theoretical arrival time) and a concurrency limit's slot (an upsert of a leased row), alone
or inside a step's claim (Postgres); wait for a limit as a timer; release a slot; count."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.sql.expression import CTE, ColumnElement, FromClause

from ledger import db
from ledger.limit_types import KeySource
from ledger.queries.common import ANY_ID, param
from ledger.queries.timers import retry_timer_pending
from ledger.schema import ledger_entries, limit_keys, limit_slots, map_items, timers
from ledger.types import LimitKind, StepState, TimerKind, TimerState

#: The shape of a limit's key: the source of each of its parts.
KeyShape = tuple[KeySource, ...]
#: A step's limits' shapes: (rate, concurrency), None where it has no such limit.
LimitsShape = tuple[KeyShape | None, KeyShape | None]

_PREFIX = {LimitKind.RATE: "rate", LimitKind.CONCURRENCY: "slot"}
_STARTED = str(StepState.STARTED)
_JSON_KEY = sa.JSON.JSONStrIndexType()


def key_expression(
    kind: LimitKind, shape: KeyShape, context: ColumnElement[Any], item: ColumnElement[Any] | None
) -> ColumnElement[str]:
    """Postgres: a limit's key rendered from a job's context (and an item), as
    `ledger.limit_types.render_key` renders it: each part a parameter (`p_rate_part0`, …)."""
    parts: list[ColumnElement[Any]] = []
    for index, source in enumerate(shape):
        name = f"{_PREFIX[kind]}_part{index}"
        if source is KeySource.TEXT:
            parts.append(param(name, "", sa.String()))
            continue
        document = context if source is KeySource.CONTEXT else item
        if document is None:
            raise ValueError("an item field in a limit's key needs the item")
        parts.append(document[param(name, "", _JSON_KEY)].as_string())
    # concat() skips NULLs: a missing or null field is empty, as in Python.
    return sa.func.concat(*parts)


def take_token(insert: Any, source: sa.Select[Any]) -> Any:
    """Take a rate limit's token for the key `source` yields, if one is free now or within
    the hold (GCRA: the key's arrival time `tat` at most `p_rate_ahead` seconds ahead),
    moving `tat` one `p_rate_interval` on; returns `hold`, the seconds to wait before
    acting (0: now). No row: no token within the hold."""
    now = db.epoch_now()
    key = limit_keys.c
    statement = insert(limit_keys).from_select(
        ["key", "tat", "granted", "throttled", "window_at", "window_granted", "updated_at"],
        source.add_columns(
            now + param("rate_interval", 1.0, sa.Float()),
            sa.literal(1),
            sa.literal(0),
            now,
            sa.literal(1),
            db.utcnow(),
        ),
    )
    interval = param("rate_interval", 1.0, sa.Float())
    # The tokens of the current second, counted for people (in the same row, no statement
    # more): a new second starts at the first token after the last one ended.
    same_second = key.window_at > now - 1.0
    return statement.on_conflict_do_update(
        index_elements=[key.key],
        set_={
            "tat": db.greatest(sa.func.coalesce(key.tat, now), now) + interval,
            "granted": key.granted + 1,
            "window_granted": sa.case((same_second, key.window_granted + 1), else_=1),
            "window_at": sa.case((same_second, key.window_at), else_=now),
            "updated_at": db.utcnow(),
        },
        where=sa.func.coalesce(key.tat, 0.0) <= now + param("rate_ahead", 0.0, sa.Float()),
    ).returning(
        # The token's own time is the arrival time before this one, less the burst's
        # tolerance: `span` is the interval plus the tolerance.
        db.greatest(key.tat - param("rate_span", 1.0, sa.Float()) - now, 0.0).label("hold")
    )


def free(slot: FromClause) -> ColumnElement[bool]:
    """A slot row is free: its holder recorded (or failed) the key it claimed, or the lease
    it claimed with ran out and the key is not held by it under a live (renewed) lease.

    Race-proof under READ COMMITTED: a claimant that waited for the row's lock re-checks
    the row as it now is, but other tables as its statement began; a new holder's key is
    invisible then, yet its fresh `locked_until`, on the row, keeps the slot taken."""
    entry = ledger_entries.c
    by_holder = sa.and_(entry.key == slot.c.entry_key, entry.owner == slot.c.holder)
    released = sa.exists().where(by_holder, entry.state != _STARTED)
    held_live = sa.exists().where(
        by_holder, entry.state == _STARTED, entry.locked_until >= db.utcnow()
    )
    return sa.or_(released, sa.and_(slot.c.locked_until < db.utcnow(), ~held_live))


def _holding() -> dict[str, Any]:
    """What a slot row says of the claim that takes it (but its entry key)."""
    return {
        "holder": param("owner", ANY_ID, sa.Uuid()),
        "locked_until": db.utcnow_plus(param("lease", 0.0, sa.Float())),
        "taken_at": db.utcnow(),
    }


def take_slot(
    key: ColumnElement[str], slot: ColumnElement[int], entry_key: ColumnElement[str]
) -> sa.Update:
    """Take an existing slot row for `p_owner`, leased for `p_lease` seconds, if it is free
    (or this owner's already); returns `slot`. (An update, not an upsert: its condition
    reads the entries, which an upsert's cannot correlate with.)"""
    row = limit_slots.c
    return (
        sa.update(limit_slots)
        .where(
            row.key == key,
            row.slot == slot,
            sa.or_(free(limit_slots), row.holder == param("owner", ANY_ID, sa.Uuid())),
        )
        .values(entry_key=entry_key, **_holding())
        .returning(row.slot)
    )


def add_slot(insert: Any, source: sa.Select[Any]) -> Any:
    """Take the slot `source` yields as (key, slot, entry key) for `p_owner` if no row has
    it yet (a row another claim just added: nothing, the slot is that claim's); returns
    `slot`."""
    holding = _holding()
    statement = insert(limit_slots).from_select(
        ["key", "slot", "entry_key", *holding], source.add_columns(*holding.values())
    )
    return statement.on_conflict_do_nothing().returning(limit_slots.c.slot)


def select_slots(key: str) -> sa.Select[Any]:
    """A concurrency limit's slot rows, with whether each is free."""
    slot = limit_slots.c
    return sa.select(slot.slot, free(limit_slots).label("free"), slot.holder).where(slot.key == key)


def slot_retry(key: ColumnElement[str]) -> ColumnElement[float]:
    """Seconds until the earliest lease of a concurrency limit's slots runs out."""
    until = sa.select(sa.func.min(limit_slots.c.locked_until)).where(limit_slots.c.key == key)
    return db.seconds_between(until.scalar_subquery(), db.utcnow())


def rate_retry(key: ColumnElement[str]) -> ColumnElement[float]:
    """Seconds until a rate limit's next token is free (no hold)."""
    tolerance = param("rate_span", 1.0, sa.Float()) - param("rate_interval", 1.0, sa.Float())
    tat = sa.select(limit_keys.c.tat).where(limit_keys.c.key == key).scalar_subquery()
    return tat - tolerance - db.epoch_now()


def release_slot(key: str, slot: int, holder: UUID) -> sa.Delete:
    """Give back a slot taken by a claim that then lost its key to another claimant."""
    row = limit_slots.c
    return sa.delete(limit_slots).where(row.key == key, row.slot == slot, row.holder == holder)


# --- inside a step's claim (Postgres) ------------------------------------------------------


def claimable(job: FromClause, takeover_expired: bool) -> ColumnElement[bool]:
    """As the claim's snapshot sees it, the job's key (`job.c.key`) is new or takeable by
    this claim: only then are a limit's token and slot taken (a duplicate delivery, a key
    in flight, a reused key, a failed key whose retry timer is pending take nothing, and
    the claim answers as without limits)."""
    entry = ledger_entries.c
    step = param("step", "", sa.String())
    takeable = [
        sa.and_(entry.state == str(StepState.FAILED), ~retry_timer_pending(job.c.id, step)),
        sa.and_(entry.state == _STARTED, entry.owner == param("owner", ANY_ID, sa.Uuid())),
    ]
    if takeover_expired:
        takeable.append(sa.and_(entry.state == _STARTED, entry.locked_until < db.utcnow()))
    ours = sa.and_(
        entry.fingerprint == job.c.fingerprint,
        entry.step == step,
        sa.or_(*takeable),
    )
    return ~sa.exists().where(entry.key == job.c.key, ~ours)


@functools.cache
def _series() -> Any:
    return sa.func.generate_series(0, param("slot_limit", 1, sa.Integer()) - 1).table_valued(
        "n", name="n"
    )


def in_claim(
    job: CTE, shape: LimitsShape, takeover_expired: bool
) -> tuple[list[ColumnElement[bool]], list[ColumnElement[Any]]]:
    """Postgres: a step's limits taken in its claim's statement, after `job` (the CTE that
    started the job: its key, fingerprint and context): the conditions the claim's source
    must meet (each limit granted), and the columns that say how the limits went."""
    rate_shape, slot_shape = shape
    rate_key = (
        key_expression(LimitKind.RATE, rate_shape, job.c.context, None) if rate_shape else None
    )
    slot_key = (
        key_expression(LimitKind.CONCURRENCY, slot_shape, job.c.context, None)
        if slot_shape
        else None
    )
    gate = (
        sa.select(
            job.c.key.label("entry_key"),
            (rate_key if rate_key is not None else sa.null()).label("rate_key"),
            (slot_key if slot_key is not None else sa.null()).label("slot_key"),
        )
        .where(job.c.key.is_not(None), claimable(job, takeover_expired))
        .cte("gate")
    )
    conditions: list[ColumnElement[bool]] = []
    columns: list[ColumnElement[Any]] = [
        sa.exists().select_from(gate).label("limit_checked"),
        sa.select(gate.c.rate_key).scalar_subquery().label("rate_key"),
        sa.select(gate.c.slot_key).scalar_subquery().label("slot_key"),
    ]
    token: CTE | None = None
    if rate_shape is not None:
        token = take_token(sa.dialects.postgresql.insert, sa.select(gate.c.rate_key)).cte("token")
        conditions.append(sa.exists().select_from(token))
        columns += [
            sa.select(token.c.hold).scalar_subquery().label("limit_hold"),
            rate_retry(sa.select(gate.c.rate_key).scalar_subquery()).label("rate_retry"),
        ]
    if slot_shape is not None:
        series = _series()
        taken = limit_slots.alias("taken")
        first_free = (
            sa.select(gate.c.slot_key, series.c.n, gate.c.entry_key)
            .select_from(gate)
            .join(series, sa.true())
            .where(
                ~sa.exists().where(
                    taken.c.key == gate.c.slot_key, taken.c.slot == series.c.n, ~free(taken)
                )
            )
            .order_by(series.c.n)
            .limit(1)
        )
        if token is not None:
            # A token first: a slot refused after it wastes a token, never holds a slot.
            first_free = first_free.where(sa.exists().select_from(token))
        candidate = first_free.cte("candidate")
        updated = take_slot(
            sa.select(candidate.c.slot_key).scalar_subquery(),
            sa.select(candidate.c.n).scalar_subquery(),
            sa.select(candidate.c.entry_key).scalar_subquery(),
        ).cte("slot_taken")
        added = add_slot(
            sa.dialects.postgresql.insert,
            sa.select(candidate).where(~sa.exists().select_from(updated)),
        ).cte("slot_added")
        slot = sa.func.coalesce(
            sa.select(updated.c.slot).scalar_subquery(), sa.select(added.c.slot).scalar_subquery()
        )
        conditions.append(slot.is_not(None))
        columns += [
            slot.label("limit_slot"),
            slot_retry(sa.select(gate.c.slot_key).scalar_subquery()).label("slot_retry"),
        ]
    return conditions, columns


# --- waits --------------------------------------------------------------------------------


def queue_waiter(key: str, interval: float, tolerance: float, lead: float) -> sa.Update:
    """Give a rate limit's waiter its wake time: the next place in line after the last
    waiter's (one interval on), and no earlier than its next token (less `lead`); count it
    throttled. Returns `due` (seconds since the epoch)."""
    row, now = limit_keys.c, db.epoch_now()
    wake = db.greatest(
        sa.func.coalesce(row.wake_at, 0.0),
        sa.func.coalesce(row.tat, now) - tolerance - lead,
        now,
    )
    return (
        sa.update(limit_keys)
        .where(row.key == key)
        .values(wake_at=wake + interval, throttled=row.throttled + 1, updated_at=db.utcnow())
        .returning((row.wake_at - interval).label("due"))
    )


def queue_slot_waiter(dialect_name: str, key: str, first: float, spacing: float) -> Any:
    """Give a concurrency limit's waiter its wake time: `first` seconds from now, or the next
    place in line after the last waiter's (`spacing` on); count it throttled. Returns `due`
    (seconds since the epoch)."""
    now = db.epoch_now()
    insert = db.insert_for(dialect_name)(limit_keys).values(
        key=key, wake_at=now + first + spacing, granted=0, throttled=1, updated_at=db.utcnow()
    )
    row = limit_keys.c
    wake = db.greatest(sa.func.coalesce(row.wake_at, 0.0), now + first)
    return insert.on_conflict_do_update(
        index_elements=[row.key],
        set_={"wake_at": wake + spacing, "throttled": row.throttled + 1, "updated_at": db.utcnow()},
    ).returning((row.wake_at - spacing).label("due"))


def set_limit_timer(
    dialect_name: str, job_id: UUID, step: str, item_id: str, limit: str, due_at: datetime
) -> Any:
    """Set (or set again) a job's step's (or item's) limit timer, due at `due_at`; a timer
    pending already keeps its time (another message of the same job waits: one will do), and
    so does one fired whose step is still in the outbox (its publish brings the step again;
    set again, the publish's `mark_sent` would mark the new wait sent before it fired).
    Returns its due time when set."""
    return set_limit_timers(dialect_name, step, limit, [(job_id, item_id, due_at)])


def set_limit_timers(
    dialect_name: str, step: str, limit: str, waits: Sequence[tuple[UUID, str, datetime]]
) -> Any:
    """`set_limit_timer` for several jobs' (or items') waits for one limit, each (job id,
    item id, due time), in one statement."""
    now = db.utcnow()
    rows = [
        {
            "job_id": job_id,
            "step": step,
            "kind": str(TimerKind.LIMIT),
            "item_id": item_id,
            "limit_key": limit,
            "state": str(TimerState.PENDING),
            "due_at": due_at,
            "created_at": now,
        }
        for job_id, item_id, due_at in waits
    ]
    insert = db.insert_for(dialect_name)(timers).values(rows)
    timer, excluded = timers.c, insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[timer.job_id, timer.step, timer.kind, timer.item_id],
        set_={
            "state": excluded.state,
            "due_at": excluded.due_at,
            "limit_key": excluded.limit_key,
            "created_at": excluded.created_at,
            "fired_at": None,
            "dispatched_at": None,
        },
        where=sa.or_(
            timer.state == str(TimerState.CANCELLED),
            sa.and_(timer.state == str(TimerState.FIRED), timer.dispatched_at.is_not(None)),
        ),
    ).returning(timer.due_at)


def touch_item_until(job_id: UUID, step: str, item_id: str, due_at: datetime) -> sa.Update:
    """Mark an item waiting for its limit touched until its timer is due: the sweeper takes
    an item for stalled only once it goes untouched for a while after that."""
    item = map_items.c
    return (
        sa.update(map_items)
        .where(item.job_id == job_id, item.step == step, item.item_id == item_id)
        .values(updated_at=due_at)
    )


# --- for people ---------------------------------------------------------------------------


def select_recent_keys(window: float, limit: int) -> sa.Select[Any]:
    """Limit keys used (a token granted, a run throttled) in the last `window` seconds, with
    their counters and the database's clock (epoch seconds)."""
    row = limit_keys.c
    return (
        sa.select(
            row.key,
            row.tat,
            row.granted,
            row.throttled,
            row.window_at,
            row.window_granted,
            db.epoch_now().label("now"),
        )
        .where(row.updated_at >= db.utcnow_plus(db.seconds(-window)))
        .order_by(row.updated_at.desc())
        .limit(limit)
    )


def count_slots_in_use(leased_within: float) -> sa.Select[Any]:
    """Concurrency slots held now, by key (among those leased in the last `leased_within`
    seconds: a slot is held past its first lease only while its key's lease is renewed)."""
    slot = limit_slots.c
    return (
        sa.select(slot.key, sa.func.count().label("in_use"))
        .where(slot.locked_until >= db.utcnow_plus(db.seconds(-leased_within)), ~free(limit_slots))
        .group_by(slot.key)
    )


def count_slots_held(keys: Sequence[str]) -> sa.Select[Any]:
    """Concurrency slots held now among `keys`, by key."""
    slot = limit_slots.c
    return (
        sa.select(slot.key, sa.func.count().label("held"))
        .where(slot.key.in_(list(keys)), ~free(limit_slots))
        .group_by(slot.key)
    )


def count_waiting(key: str, window: float, cap: int) -> sa.Select[Any]:
    """A limit key's waits: pending now (`waiting`), and set (or set again) in the last
    `window` seconds (`recent`), each read from the partial index on limit timers no further
    than `cap + 1` entries, however many wait."""
    timer = timers.c
    of_key = (timer.kind == str(TimerKind.LIMIT), timer.limit_key == key)
    since = db.utcnow_plus(db.seconds(-window))
    counts = []
    for name, where in (
        ("waiting", timer.state == str(TimerState.PENDING)),
        ("recent", timer.created_at >= since),
    ):
        some = sa.select(sa.literal(1)).select_from(timers).where(*of_key, where).limit(cap + 1)
        counted = sa.select(sa.func.count()).select_from(some.subquery())
        counts.append(counted.scalar_subquery().label(name))
    return sa.select(*counts)
