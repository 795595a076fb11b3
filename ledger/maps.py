"""`MapLedger`: a map step's items in the ledger — written in batches with the step's record,
claimed and recorded by the step protocol (their keys are ledger entries, fenced by owner
token), counted once each by the fan-in, joined once. Must not import celery, kombu, jobs or
config."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, TypeVar
from uuid import UUID, uuid4

from sqlalchemy.engine import Connection, Engine

from ledger import db, fan_in, map_counters, queries
from ledger.errors import ItemConflict, LeaseLost, LedgerError, StatementRejected
from ledger.fan_in import INSERT_BATCH
from ledger.map_types import (
    FanOut,
    ItemClaim,
    ItemFound,
    ItemRecorded,
    ItemResult,
    LostItem,
    MapCounters,
    NewItem,
)
from ledger.outcomes import Failure, answer, decode_item_claim
from ledger.types import (
    JSON,
    AlreadySucceeded,
    Claim,
    DeadLetterReason,
    EventKind,
    ItemState,
    StepState,
)

T = TypeVar("T")

#: Items per page when the join reads a map's results.
READ_PAGE: Final = 500


class MapLedger:
    """A map step's items over one engine (Postgres or SQLite: plain Core statements, a
    transaction per call).

    Args:
        engine: where the ledger lives.
        lease_seconds: how long an item's claim stays its owner's.
        unavailable_for: how long a call keeps retrying while the database is unreachable.
    """

    def __init__(
        self, *, engine: Engine, lease_seconds: float, unavailable_for: float = 15.0
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.unavailable_for = unavailable_for
        self._dialect = engine.dialect.name

    # --- fan-out --------------------------------------------------------------------------

    def fan_out(
        self,
        claim: Claim,
        items: Iterable[NewItem],
        *,
        policy: str,
        next_step: str | None,
        duration_ms: float | None,
        replayable: bool = True,
    ) -> FanOut:
        """Record a map step: its key succeeded, its items written as they come (one INSERT
        per `INSERT_BATCH`, never all of them in memory at once, left in the outbox), its
        counters — all in one transaction. A map with no items moves its job on at once.
        An item given twice (the same id and content) is one item.

        Args:
            items: read once per try; a stream that cannot be read again
                (`replayable=False`) is tried once: a lost connection is raised, not retried.

        Raises:
            LeaseLost: another owner took the step's key over.
            ItemConflict: one item id given with two contents (nothing is written).
            Exception: whatever reading `items` raised (nothing is written).
        """
        placeholder = queries.finish_params(claim.key, claim.owner, result={"items": 0})

        def attempt() -> FanOut:
            with db.transaction(self.engine) as conn:
                finished = conn.execute(queries.finish_entry(StepState.SUCCEEDED), placeholder)
                if finished.one_or_none() is None:
                    return self._fanned_out_before(conn, claim)
                conn.execute(queries.insert_map(self._dialect, claim.job_id, claim.step, policy))
                total = fan_in.insert_roots(conn, claim.job_id, claim.step, items)
                done: JSON = {"items": total}
                conn.execute(queries.set_entry_result(claim.key, done))
                counters = map_counters.count(
                    conn, claim.job_id, claim.step, total=total, remaining=total
                )
                event = queries.append_event(
                    claim.job_id,
                    claim.step,
                    EventKind.SUCCEEDED,
                    key=claim.key,
                    attempt=claim.attempt,
                    duration_ms=duration_ms,
                    detail=done,
                )
                conn.execute(event)
                conn.execute(queries.note_fan_out(claim.job_id, claim.step, done))
                joined = None
                if counters.remaining == 0:
                    joined = map_counters.join(conn, claim.job_id, claim.step, next_step)
                return FanOut(total, joined)

        return self._retrying(attempt) if replayable else attempt()

    def _fanned_out_before(self, conn: Connection, claim: Claim) -> FanOut:
        """After a fenced-out fan-out: our own earlier commit (retried after an ambiguous
        one: its items are in the outbox, the sweeper sends them) or a takeover."""
        entry = conn.execute(queries.select_entry(claim.key)).mappings().one_or_none()
        if entry is not None and entry["owner"] == claim.owner:
            return FanOut(0)
        raise LeaseLost(claim.key, claim.job_id, claim.step)

    def mark_dispatched(self, job_id: UUID, step: str, item_ids: Sequence[str]) -> None:
        """Take published items out of the outbox (one UPDATE per `INSERT_BATCH`)."""
        if not item_ids:
            return

        def attempt() -> None:
            with db.transaction(self.engine) as conn:
                keys = _keys(conn, job_id, step, item_ids)
                for start in range(0, len(keys), INSERT_BATCH):
                    batch = keys[start : start + INSERT_BATCH]
                    conn.execute(queries.mark_items_dispatched(job_id, step, batch))

        self._retrying(attempt)

    def outbox_page(
        self, job_id: UUID, step: str, *, after: str, limit: int
    ) -> list[tuple[str, str]]:
        """Up to `limit` (item id, path) of a map's items in the outbox, in item order after
        the path `after` ("" for the first page)."""
        page = queries.select_outbox_page(job_id, step, after, limit)

        def attempt() -> list[tuple[str, str]]:
            with db.single_statement(self.engine) as conn:
                return [(str(item_id), str(path)) for item_id, path in conn.execute(page)]

        return self._retrying(attempt)

    def touch_outbox(self, job_id: UUID, step: str) -> None:
        """Mark a map's items in the outbox touched: they are being published, and the
        sweeper leaves them alone for `relay_after` more."""
        with db.single_statement(self.engine) as conn:
            conn.execute(queries.touch_outbox(job_id, step))

    # --- claim ----------------------------------------------------------------------------

    def claim_items(
        self, job_id: UUID, step: str, item_ids: Sequence[str], *, takeover_expired: bool = True
    ) -> list[ItemFound | LedgerError]:
        """Claim items' keys as a step's key is claimed, for one owner (the run that acts on
        them), in one statement, then read what each found, in a second (after a first that
        reads the step's key, theirs but for the item id): for each, the claim, or what was
        found instead (or `FingerprintMismatch`: its key was first used for another
        request)."""
        owner = uuid4()
        claim = queries.claim_items(self._dialect, takeover_expired)
        values = {
            "p_job_id": job_id,
            "p_step": step,
            "p_owner": owner,
            "p_lease": self.lease_seconds,
        }

        def attempt() -> list[ItemFound | LedgerError]:
            with db.transaction(self.engine) as conn:
                keys = _keys(conn, job_id, step, item_ids)
                claimed: dict[str, int] = {
                    row.key: row.attempts for row in conn.execute(claim, {**values, "p_keys": keys})
                }
                looked = queries.select_items_for_claim(job_id, step, keys)
                rows = {row["item_id"]: row for row in conn.execute(looked).mappings()}
            found: list[ItemFound | LedgerError] = []
            for item_id in item_ids:
                row = rows.get(item_id)
                attempts = claimed.get(row["key"]) if row is not None else None
                item = (job_id, step, item_id)
                found.append(
                    answer(decode_item_claim, item, owner, attempts, row, takeover_expired)
                )
            return found

        return self._retrying(attempt)

    # --- record ---------------------------------------------------------------------------

    def record_items(
        self,
        done: Sequence[tuple[ItemClaim, JSON, Sequence[NewItem]]],
        *,
        next_step: str | None,
    ) -> list[ItemRecorded | LedgerError]:
        """Record items' results (and the items each expanded into, in the same
        transaction), counting each item once, on its first transition to done. One
        transaction for the lot; if one is refused, each alone.

        Returns, for each: what its record did, or `LeaseLost` (another owner took the key
        over: do not hand anything on) or `StatementRejected`.
        """

        finish = queries.finish_entry(StepState.SUCCEEDED)

        def attempt() -> list[ItemRecorded | LedgerError]:
            recorded: dict[int, ItemRecorded | LedgerError] = {}
            finished: list[tuple[ItemClaim, Sequence[NewItem]]] = []
            with db.transaction(self.engine) as conn:
                for index, (claim, result, children) in enumerate(done):
                    values = queries.finish_params(claim.key, claim.owner, result=result)
                    if conn.execute(finish, values).one_or_none() is not None:
                        finished.append((claim, children))
                        continue
                    # Fenced out is this item's alone; a statement the database refuses
                    # aborts the transaction, and each item is then recorded alone.
                    try:
                        recorded[index] = self._recorded_before(conn, claim, StepState.SUCCEEDED)
                    except LeaseLost as exc:
                        recorded[index] = exc
                settled = fan_in.settle(conn, finished, ItemState.DONE, next_step)
            by_id = {claim.item_id: index for index, (claim, _, _) in enumerate(done)}
            recorded.update({by_id[item_id]: each for item_id, each in settled.items()})
            return [recorded[index] for index in range(len(done))]

        try:
            return self._retrying(attempt)
        except StatementRejected as exc:
            if len(done) == 1:
                # An expansion's clash names the id; any other refusal, the item.
                refused = exc if isinstance(exc, ItemConflict) else None
                return [refused or StatementRejected(_rejected(done[0][0]))]
            return [self.record_items([one], next_step=next_step)[0] for one in done]

    def record_item_failure(
        self,
        claim: ItemClaim,
        failure: Failure,
        *,
        max_failed: int | None,
        next_step: str | None,
    ) -> ItemRecorded:
        """Record an item's failed attempt: its key free for a retry, or the item
        dead-lettered on its own (its key `failed` or `unknown`): settled (the join reads it) while
        the map's settled failures stay within `max_failed` (None: any number), else waiting
        for a person to replay it.

        Raises:
            LeaseLost: another owner took the key over meanwhile.
        """
        state = StepState.UNKNOWN if failure.outcome_unknown else StepState.FAILED
        values = queries.finish_params(claim.key, claim.owner, error=failure.error)

        def attempt() -> ItemRecorded:
            with db.transaction(self.engine) as conn:
                finished = conn.execute(queries.finish_entry(state), values).one_or_none()
                if finished is None:
                    return self._recorded_before(conn, claim, state)
                if failure.retry_in is not None:
                    conn.execute(queries.touch_item(claim.job_id, claim.step, claim.item_id))
                    return ItemRecorded(claim.key, counted=False)
                failed = [(claim, ())]
                settled = fan_in.settle(conn, failed, ItemState.FAILED, next_step, max_failed)
                recorded = settled[claim.item_id]
                if recorded.counted:
                    fan_in.dead_letter(
                        conn, claim, failure, finished.attempts, finished.first_failed_at
                    )
                return recorded

        return self._retrying(attempt)

    def dead_letter_item(
        self,
        item: tuple[UUID, str, str, str],
        error: JSON,
        *,
        reason: DeadLetterReason,
        mark_unknown: UUID | None,
        attempts: int,
        max_failed: int | None,
        next_step: str | None,
    ) -> ItemRecorded | None:
        """Dead-letter an item whose key could not be claimed — (job id, step, item id,
        key) — after marking its key `unknown` if `mark_unknown` names the owner whose lease
        ran out (an at-most-once item); None if that owner recorded late or another took the
        key over meanwhile (claim it again to see)."""
        job_id, step, item_id, key = item

        def attempt() -> ItemRecorded | None:
            with db.transaction(self.engine) as conn:
                if mark_unknown is not None:
                    marked = conn.execute(queries.mark_unknown(key, mark_unknown))
                    if marked.one_or_none() is None:
                        return None
                found = conn.execute(queries.select_item_by_key(job_id, step, key)).mappings()
                value = next((row["item"] for row in found if row["item_id"] == item_id), None)
                claim = ItemClaim(
                    job_id, step, key, uuid4(), attempts, {}, {}, item_id=item_id, item=value
                )
                failed = [(claim, ())]
                settled = fan_in.settle(conn, failed, ItemState.FAILED, next_step, max_failed)
                recorded = settled[claim.item_id]
                if recorded.counted:
                    failure = Failure(error, None, reason=reason)
                    fan_in.dead_letter(conn, claim, failure, attempts, None)
                return recorded

        return self._retrying(attempt)

    def adopt_item(
        self, found: AlreadySucceeded, item_id: str, *, next_step: str | None
    ) -> ItemRecorded:
        """Count an item whose key another job recorded (the same request): done, with that
        result, without acting again."""

        def attempt() -> ItemRecorded:
            with db.transaction(self.engine) as conn:
                claim = ItemClaim(
                    found.job_id, found.step, found.key, uuid4(), 0, {}, {}, item_id=item_id
                )
                done = fan_in.settle(conn, [(claim, ())], ItemState.DONE, next_step)
                return done[item_id]

        return self._retrying(attempt)

    def _recorded_before(
        self, conn: Connection, claim: ItemClaim, state: StepState
    ) -> ItemRecorded:
        """After a fenced-out record: our own earlier commit (an ambiguous one, retried: it
        counted then, and its children wait in the outbox) or a takeover."""
        entry = conn.execute(queries.select_entry(claim.key)).mappings().one_or_none()
        if entry is not None and entry["owner"] == claim.owner and entry["state"] == state:
            return ItemRecorded(claim.key, counted=False)
        raise LeaseLost(claim.key, claim.job_id, claim.step)

    # --- reading --------------------------------------------------------------------------

    def counters(self, job_id: UUID) -> list[MapCounters]:
        """Each map step's counters of a job."""
        with db.single_statement(self.engine) as conn:
            rows = conn.execute(queries.select_map_counters(job_id)).mappings().all()
        return [map_counters.counters_of(row["step"], row) for row in rows]

    def item_results(
        self, job_id: UUID, step: str, *, page: int = READ_PAGE
    ) -> Iterator[ItemResult]:
        """A map's items with their results, in item order (each root item in the order the
        step produced it, then the items it expanded into), read page by page: never the
        whole map in memory."""
        after: str | None = None
        while True:
            with db.single_statement(self.engine) as conn:
                rows = conn.execute(queries.select_items_page(job_id, step, after, page)).all()
            for row in rows:
                yield ItemResult(
                    row.item_id, row.item, ItemState(row.state), row.result, row.error, row.children
                )
            if len(rows) < page:
                return
            after = rows[-1].path

    def recent_items(self, *, window: float) -> int:
        """How many items were done in the last `window` seconds."""
        with db.single_statement(self.engine) as conn:
            return int(conn.execute(queries.count_recent_items(window)).scalar_one())

    def item_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of these keys are items' (the others: steps')."""
        found: set[str] = set()
        for start in range(0, len(keys), READ_PAGE):
            chunk = keys[start : start + READ_PAGE]
            with db.single_statement(self.engine) as conn:
                found.update(conn.execute(queries.select_item_keys(chunk)).scalars())
        return found

    def key_holder(self, key: str) -> UUID | None:
        """The job that recorded a key (None: no entry)."""
        with db.single_statement(self.engine) as conn:
            entry = conn.execute(queries.select_entry(key)).mappings().one_or_none()
        return entry["job_id"] if entry is not None else None

    def take_lost_items(
        self,
        *,
        stalled_after: float,
        relay_after: float,
        limit: int,
        pipelines: Sequence[str] | None = None,
        sent_between: tuple[float, float | None] | None = None,
    ) -> list[LostItem]:
        """Pending items that look lost — left in the outbox, abandoned by a dead owner, or
        stalled; or (`sent_between`: (before, after) seconds ago) handed to a broker that
        lost its queues then — marked touched so that the next sweep leaves them alone;
        SKIP LOCKED."""
        if sent_between is not None:
            before, after = sent_between
            take = queries.take_items_sent_between(self._dialect, before, after, limit, pipelines)
        else:
            take = queries.take_lost_items(
                self._dialect,
                stalled_after=stalled_after,
                relay_after=relay_after,
                limit=limit,
                pipelines=pipelines,
            )
        with db.transaction(self.engine) as conn:
            rows = conn.execute(take).all()
        return [LostItem(row[0], row[3], row[1], row[2]) for row in rows]

    def _retrying(self, call: Callable[[], T]) -> T:
        return db.retry_while_unavailable(call, for_seconds=self.unavailable_for)


def _keys(conn: Connection, job_id: UUID, step: str, item_ids: Sequence[str]) -> list[str]:
    """The keys of a job's map step's items (none if the job is gone): found by key, never by
    job and step (see `queries.maps.checked`)."""
    step_key = conn.execute(queries.select_step_key(job_id, step)).scalar_one_or_none()
    return [] if step_key is None else [f"{step_key}/{item_id}" for item_id in item_ids]


def _rejected(claim: ItemClaim) -> str:
    return f"the record of item {claim.item_id!r} (key {claim.key!r}) was refused"
