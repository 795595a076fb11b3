"""Admission to a limited step's queue: a key's backlog stays in the ledger, not in the
broker's one queue, where another key's first run would wait behind all of it.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger import db
from ledger.limit_types import LimitRules
from ledger.limits import SLOT_SPACING
from ledger.queries import limits as limit_queries
from ledger.schema import limit_keys, step_events
from ledger.types import JSON, EventKind, LimitKind

#: Parked runs' timers set per statement (their parameters stay well under a driver's cap).
_CHUNK = 1_000


def gate(rules: LimitRules) -> tuple[LimitKind, int, float]:
    """The limit a step's runs are admitted by (its concurrency limit if it has one, else
    its rate limit): its kind, how many runs of a key may be queued at once (the limit's
    slots, the rate's burst), and how far apart its parked runs wake, in seconds."""
    if rules.slots is not None:
        limit = rules.slots.limit
        return LimitKind.CONCURRENCY, limit, SLOT_SPACING / limit
    assert rules.rate is not None
    return LimitKind.RATE, rules.rate.burst, rules.rate.interval


def admit(
    engine: Engine,
    step: str,
    rules: LimitRules,
    runs: Sequence[tuple[UUID, Mapping[str, JSON]]],
) -> list[UUID]:
    """Of `runs` (job id, context) about to be sent to limited `step`, those to send now:
    per key, none while the key has runs waiting in line (its last waiter not yet woken),
    else as many as it may hold at once. The others are parked, in one transaction: each a
    `limit` timer lined up behind the key's waiters, its history saying it waits, sent by
    the timer loop when due. A run sent that finds its limit taken waits the same way (its
    claim is refused), so the count admitted is a bound on the queue, not on the limit."""
    kind, room, spacing = gate(rules)
    by_key: dict[str, list[UUID]] = defaultdict(list)
    for job_id, context in runs:
        rate_key, slot_key = rules.render(context)
        key = slot_key if kind is LimitKind.CONCURRENCY else rate_key
        assert key is not None
        by_key[key].append(job_id)

    def attempt() -> list[UUID]:
        with db.transaction(engine) as conn:
            rooms = _rooms(conn, kind, list(by_key), rules)
            send: list[UUID] = []
            for key, job_ids in by_key.items():
                now = min(room, rooms.get(key, room))
                send.extend(job_ids[:now])
                if job_ids[now:]:
                    _park(conn, step, key, kind, job_ids[now:], spacing)
            return send

    return db.retry_while_unavailable(attempt, for_seconds=15.0)


def _rooms(conn: Connection, kind: LimitKind, keys: list[str], rules: LimitRules) -> dict[str, int]:
    """How many runs each key (of those known) may be sent now: none while its waiters are
    lined up (the last not yet woken); else its free slots, or, for a rate limit, its burst
    after a quiet spell, one while its next token can be taken (within the hold), none
    after."""
    row, now = limit_keys.c, db.epoch_now()
    found = sa.select(row.key, row.tat, row.wake_at, now.label("now")).where(row.key.in_(keys))
    rooms: dict[str, int] = {}
    for each in conn.execute(found):
        if each.wake_at is not None and each.wake_at > each.now:
            rooms[each.key] = 0
        elif kind is LimitKind.RATE and rules.rate is not None and each.tat is not None:
            rate = rules.rate
            ahead = each.tat - each.now
            rooms[each.key] = rate.burst if ahead <= 0 else int(ahead <= rate.tolerance + rate.hold)
    if kind is LimitKind.CONCURRENCY and rules.slots is not None:
        limit = rules.slots.limit
        held = conn.execute(limit_queries.count_slots_held(keys))
        for each in held:
            key = str(each.key)
            rooms[key] = min(rooms.get(key, limit), max(0, limit - int(each.held)))
    return rooms


def _park(
    conn: Connection, step: str, key: str, kind: LimitKind, job_ids: list[UUID], spacing: float
) -> None:
    """Line `job_ids` up behind `key`'s waiters, `spacing` apart, as `limit` timers."""
    dialect = conn.dialect.name
    # One place in line for the lot, as long as all of theirs.
    queued = limit_queries.queue_slot_waiter(dialect, key, spacing, spacing * len(job_ids))
    first = float(conn.execute(queued).scalar_one())
    dues = [datetime.fromtimestamp(first + n * spacing, UTC) for n in range(len(job_ids))]
    for start in range(0, len(job_ids), _CHUNK):
        waits = [(job_id, "", due) for job_id, due in zip(job_ids, dues, strict=True)]
        chunk = waits[start : start + _CHUNK]
        conn.execute(limit_queries.set_limit_timers(dialect, step, key, chunk))
    events = [
        {
            "job_id": job_id,
            "step": step,
            "kind": str(EventKind.LIMITED),
            "detail": {"limit": key, "kind": str(kind), "until": due.isoformat()},
        }
        for job_id, due in zip(job_ids, dues, strict=True)
    ]
    conn.execute(sa.insert(step_events).values(at=db.utcnow()), events)
