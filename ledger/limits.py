"""`LimitLedger`: limits every worker obeys, held here. A claim takes its step's token and
slot (`take_limits` where the claim is several statements; inside the claim's one statement
on Postgres, `queries.limits.in_claim`); a claim refused waits as a `limit` timer, set here.
Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger import db, queries
from ledger.errors import LedgerError
from ledger.limit_types import LimitRules
from ledger.map_types import ItemFound
from ledger.outcomes import answer, decode_item_claim, hold_until, limit_busy
from ledger.queries import limits as limit_queries
from ledger.queries.common import ACTIVE, param
from ledger.types import JSON, EventKind, ItemState, LimitBusy, LimitKind, StepState

T = TypeVar("T")

#: A rate limit's waiter wakes this much before its token is likely free (within the hold,
#: which it then waits out in the worker): the timer loop and the broker take some time.
WAKE_LEAD: Final = 0.1
#: Seconds between two waiters of a concurrency limit of 1 waking (of a limit of n, a n-th
#: of it): a contended key's waiters are let through at most 5 x limit a second, and a
#: backlog of them costs that many looks a second, not one a second each.
SLOT_SPACING: Final = 0.2


def claimable(
    entry: Mapping[str, Any] | None,
    values: Mapping[str, Any],
    takeover: bool,
    *,
    retry_pending: Callable[[], bool] | None = None,
) -> bool:
    """As `queries.limits.claimable`, from the entry a claim found (`select_entry_for_claim`)
    and the claim's values: whether the claim would take the key (limits are taken only
    then). `retry_pending`, asked of a failed key only: whether the step's retry timer is
    pending (the retry fence: a step's claim, not a map item's)."""
    if entry is None or entry.get("entry_state") is None:
        return True
    if (
        entry["entry_fingerprint"] != values["p_fingerprint"]
        or entry["entry_step"] != (values["p_step"])
    ):
        return False
    state = entry["entry_state"]
    if state == StepState.FAILED:
        return retry_pending is None or not retry_pending()
    started = state == StepState.STARTED
    return started and (
        entry["entry_owner"] == values["p_owner"]
        or (takeover and bool(entry["entry_lease_expired"]))
    )


def take_limits(
    conn: Connection,
    rules: LimitRules,
    values: Mapping[str, Any],
    *,
    context: Mapping[str, JSON],
    item: JSON = None,
) -> dict[str, Any]:
    """Take a claim's token and slot (in the caller's transaction, before its claim): the
    columns `queries.limits.in_claim` answers with on Postgres. `values`: the claim's
    (`p_owner`, `p_lease`, `p_key`: the key it claims)."""
    rate_key, slot_key = rules.render(context, item)
    found: dict[str, Any] = {"limit_checked": True, "rate_key": rate_key, "slot_key": slot_key}
    params = {**values, **rules.params()}
    insert = db.insert_for(conn.dialect.name)
    if rules.rate is not None:
        token = limit_queries.take_token(insert, sa.select(param("rate_key", "", sa.String())))
        hold = conn.execute(token, {**params, "p_rate_key": rate_key}).scalar_one_or_none()
        found["limit_hold"] = hold
        if hold is None:
            retry = sa.select(limit_queries.rate_retry(param("rate_key", "", sa.String())))
            found["rate_retry"] = conn.execute(retry, {**params, "p_rate_key": rate_key}).scalar()
            return found
    if rules.slots is not None:
        assert slot_key is not None
        found["limit_slot"] = _take_slot(conn, slot_key, rules.slots.limit, params)
        if found["limit_slot"] is None:
            retry = sa.select(limit_queries.slot_retry(param("slot_key", "", sa.String())))
            found["slot_retry"] = conn.execute(retry, {"p_slot_key": slot_key}).scalar()
    return found


def _take_slot(conn: Connection, key: str, limit: int, params: Mapping[str, Any]) -> int | None:
    """The first of a key's slots found free taken for the claim's owner, or None."""
    rows = {row.slot: row for row in conn.execute(limit_queries.select_slots(key))}
    owner = params["p_owner"]
    where = {**params, "p_slot_key": key, "p_entry_key": params["p_key"]}
    for number in range(limit):
        row = rows.get(number)
        if row is not None and not (row.free or row.holder == owner):
            continue
        taken = _take_slot_statement(conn, row is None)
        got: int | None = conn.execute(taken, {**where, "p_slot_no": number}).scalar_one_or_none()
        if got is not None:
            return int(got)
    return None


def _take_slot_statement(conn: Connection, new: bool) -> Any:
    key = param("slot_key", "", sa.String())
    number = param("slot_no", 0, sa.Integer())
    entry_key = param("entry_key", "", sa.String())
    if new:
        insert = db.insert_for(conn.dialect.name)
        return limit_queries.add_slot(insert, sa.select(key, number, entry_key))
    return limit_queries.take_slot(key, number, entry_key)


def refused(taken: Mapping[str, Any]) -> bool:
    """Whether `take_limits` was refused a token or a slot."""
    return ("limit_hold" in taken and taken["limit_hold"] is None) or (
        "limit_slot" in taken and taken["limit_slot"] is None
    )


def release_if_lost(conn: Connection, row: Mapping[str, Any], owner: UUID) -> None:
    """Give back the slot a claim took for a key it then did not get (another claimant was
    first): it would be held, unused, for a lease."""
    if row.get("limit_slot") is not None and row.get("claimed_attempts") is None:
        conn.execute(limit_queries.release_slot(row["slot_key"], row["limit_slot"], owner))


def claim_items_limited(
    conn: Connection,
    items: tuple[UUID, str, Sequence[str], Sequence[str]],
    taking: tuple[Any, Mapping[str, Any], LimitRules, bool],
) -> list[ItemFound | LedgerError]:
    """Claim map items under their step's limits, one by one in the caller's transaction:
    each item's (and its job's) row read first, its token and slot taken if its key is free
    to claim (its limits' keys may name its fields), then its key claimed (`claim`,
    `queries.claim_items` with `values`). `items`: job id, step, item ids and their keys."""
    job_id, step, item_ids, keys = items
    claim, values, rules, takeover = taking
    looked = queries.select_items_for_claim(job_id, step, keys)
    rows = {row["item_id"]: row for row in conn.execute(looked).mappings()}
    owner: UUID = values["p_owner"]
    found: list[ItemFound | LedgerError] = []
    for item_id in item_ids:
        row = rows.get(item_id)
        attempts: int | None = None
        taken: dict[str, Any] = {}
        if (
            row is not None
            and row["job_state"] in ACTIVE
            and row["item_state"] == ItemState.PENDING
        ):
            own = {**values, "p_key": row["key"], "p_fingerprint": row["fingerprint"]}
            if claimable(dict(row), own, takeover):
                taken = take_limits(conn, rules, own, context=row["context"], item=row["item"])
                if not refused(taken):
                    attempts = conn.execute(claim, {**values, "p_keys": [row["key"]]}).scalar()
                    release_if_lost(conn, {**taken, "claimed_attempts": attempts}, owner)
        busy = None
        if row is not None and taken:
            busy = limit_busy(job_id, step, row["key"], {**taken, "claimed_attempts": attempts})
        if busy is not None:
            found.append(busy)
            continue
        hold = hold_until(taken.get("limit_hold"))
        item = (job_id, step, item_id)
        found.append(answer(decode_item_claim, item, owner, attempts, row, takeover, hold))
    return found


@dataclass(frozen=True)
class Wait:
    """A limit wait as set: when the timer is due, and for which limit."""

    due_at: datetime
    kind: LimitKind
    limit: str


@dataclass(frozen=True)
class LimitStat:
    """One limit key as people see it."""

    key: str
    #: `rate` (the key has an arrival time) or `concurrency`.
    kind: LimitKind
    #: Slots held now (concurrency), or tokens granted in the last second (rate).
    in_use: int
    #: Runs waiting for it now (pending `limit` timers), counted up to the cap + 1 (that
    #: many: more).
    waiting: int
    #: Waits set (or set again) per second over the window.
    throttled_per_second: float
    granted_total: int
    throttled_total: int


#: Seconds `LimitLedger.stats` looks back by default: waits set and keys used.
STATS_WINDOW: Final = 60.0
#: The most waits `LimitLedger.stats` counts of a key (index entries only): past it the
#: count is this (100,000 runs parked for one key would otherwise be read at every look).
LIMIT_WAITING_CAP: Final = 10_000


class LimitLedger:
    """Sets limit waits, releases slots and reads the limits' state; usable from plain
    Python.

    Args:
        engine: where the ledger lives.
        unavailable_for: how long a call keeps retrying while the database is unreachable.
    """

    def __init__(self, *, engine: Engine, unavailable_for: float = 15.0) -> None:
        self.engine = engine
        self.unavailable_for = unavailable_for

    def wait(self, busy: LimitBusy, rules: LimitRules, *, item_id: str = "") -> Wait:
        """Put a step (or a map item) whose claim its limit refused back as a `limit`
        timer, in one transaction: due when its token is likely free — the next place in
        line after the rate limit's last waiter (waiters wake one interval apart, never all
        at once) — or, for a slot, after `busy.retry_in`. A step's history says it waits
        (an item's does not: a map may have 100,000); an item is touched until then, so
        the sweeper does not take it for stalled. Nothing was claimed: no attempt is used."""

        def attempt() -> Wait:
            with db.transaction(self.engine) as conn:
                due = self._due(conn, busy, rules)
                dialect = conn.dialect.name
                set_timer = limit_queries.set_limit_timer(
                    dialect, busy.job_id, busy.step, item_id, busy.limit, due
                )
                conn.execute(set_timer)
                if item_id:
                    touch = limit_queries.touch_item_until(busy.job_id, busy.step, item_id, due)
                    conn.execute(touch)
                else:
                    detail: JSON = {
                        "limit": busy.limit,
                        "kind": str(busy.kind),
                        "until": due.isoformat(),
                    }
                    event = queries.append_event(
                        busy.job_id, busy.step, EventKind.LIMITED, key=busy.key, detail=detail
                    )
                    conn.execute(event)
                return Wait(due, busy.kind, busy.limit)

        return self._retrying(attempt)

    def stats(
        self, *, window: float = STATS_WINDOW, limit: int = 50, waiting_cap: int = LIMIT_WAITING_CAP
    ) -> list[LimitStat]:
        """The limit keys in use or waited for lately, busiest first (at most `limit`):
        slots held or tokens granted in the last second, runs waiting and waits set per
        second over the last `window` seconds (each counted up to `waiting_cap` + 1), and
        their totals."""
        with db.transaction(self.engine) as conn:
            keys = list(conn.execute(limit_queries.select_recent_keys(window, limit)))
            in_use = conn.execute(limit_queries.count_slots_in_use(3600.0))
            held: dict[str, int] = {str(row.key): int(row.in_use) for row in in_use}
            # The keys to show: used lately, or holding the most slots (a count each, capped).
            busiest_held = sorted(held, key=lambda key: -held[key])[:limit]
            shown = dict.fromkeys([*(str(row.key) for row in keys), *busiest_held])
            waits = {
                key: conn.execute(limit_queries.count_waiting(key, window, waiting_cap)).one()
                for key in shown
            }
        found: dict[str, LimitStat] = {}
        for row in keys:
            rate = row.tat is not None
            recent = row.window_at is not None and row.now - row.window_at < 2.0
            used = (row.window_granted if recent else 0) if rate else held.get(row.key, 0)
            found[row.key] = _stat(row.key, rate, used, waits.get(row.key), window, row)
        for key, count in held.items():
            found.setdefault(key, _stat(key, False, count, waits.get(key), window, None))
        busiest = sorted(found.values(), key=lambda each: (-(each.in_use + each.waiting), each.key))
        return busiest[:limit]

    @staticmethod
    def _due(conn: Connection, busy: LimitBusy, rules: LimitRules) -> datetime:
        rate = rules.rate
        if busy.kind is LimitKind.RATE and rate is not None:
            queued = limit_queries.queue_waiter(
                busy.limit, rate.interval, rate.tolerance, WAKE_LEAD
            )
            due: float | None = conn.execute(queued).scalar_one_or_none()
            if due is not None:
                return datetime.fromtimestamp(float(due), UTC)
        # A slot's waiters are lined up too: however many wait, a key is looked at a few
        # times a second, never once a second by each of them.
        spacing = SLOT_SPACING / (rules.slots.limit if rules.slots is not None else 1)
        queued = limit_queries.queue_slot_waiter(
            conn.dialect.name, busy.limit, busy.retry_in, spacing
        )
        due = float(conn.execute(queued).scalar_one())
        return datetime.fromtimestamp(due, UTC)

    def _retrying(self, call: Callable[[], T]) -> T:
        return db.retry_while_unavailable(call, for_seconds=self.unavailable_for)


def _stat(key: str, rate: bool, in_use: int, wait: Any, window: float, counters: Any) -> LimitStat:
    return LimitStat(
        key=key,
        kind=LimitKind.RATE if rate else LimitKind.CONCURRENCY,
        in_use=int(in_use),
        waiting=int(wait.waiting or 0) if wait is not None else 0,
        throttled_per_second=round(float(wait.recent or 0) / window, 3)
        if wait is not None
        else 0.0,
        granted_total=int(counters.granted) if counters is not None else 0,
        throttled_total=int(counters.throttled) if counters is not None else 0,
    )
