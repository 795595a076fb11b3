"""`DeadLetterStore`: the dead letters people list, replay, resolve and purge, and how a job
becomes one. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.engine import Connection, Engine, Row, RowMapping

from ledger import db, item_letters, queries
from ledger.errors import DeadLetterNotFound
from ledger.item_letters import Refusal
from ledger.types import (
    JSON,
    DeadLetter,
    DeadLetterReason,
    DeadLetterState,
    EventKind,
    JobState,
    Purged,
    Refused,
    Reopened,
    Settled,
    StepState,
)


@dataclass(frozen=True)
class DeadLetterNote:
    """What a dead letter says, before the job's row adds its input."""

    job_id: UUID
    step: str
    key: str | None
    error: JSON
    reason: DeadLetterReason
    duration_ms: float | None = None


def write_dead_letter(
    conn: Connection, letter: DeadLetterNote, attempts: int, first_failed_at: datetime | None
) -> JobState:
    """Inside the caller's transaction: end an active job as dead-lettered, append the event and
    write the dead letter; a job no longer active (cancelled meanwhile) keeps its state."""
    job = conn.execute(queries.finish_job(letter.job_id, JobState.DEAD_LETTERED)).one_or_none()
    if job is None:
        state = conn.execute(queries.select_job(letter.job_id)).mappings().one_or_none()
        return JobState(state["state"]) if state is not None else JobState.CANCELLED
    # Its timers never fire now: a pending one (a retry's, a wait's) would otherwise outlive
    # the job, and send its step again if a person replays the letter.
    conn.execute(queries.cancel_unlocked_timers(conn.dialect.name, letter.job_id))
    detail: JSON = {"error": letter.error, "reason": str(letter.reason)}
    conn.execute(
        queries.append_event(
            letter.job_id,
            letter.step,
            EventKind.DEAD_LETTERED,
            key=letter.key,
            attempt=attempts or None,
            duration_ms=letter.duration_ms,
            detail=detail,
        )
    )
    conn.execute(queries.insert_dead_letter(_letter_row(letter, job, attempts, first_failed_at)))
    return JobState.DEAD_LETTERED


def write_item_dead_letter(
    conn: Connection,
    letter: DeadLetterNote,
    attempts: int,
    first_failed_at: datetime | None,
    item: tuple[str, JSON],
) -> None:
    """Inside the caller's transaction: dead-letter one item of a map step on its own. Its
    job stays active: the other items go on, and the join waits for this one's replay (or,
    if its map's policy settles it, reads it failed)."""
    job = conn.execute(queries.select_job(letter.job_id)).one()
    item_id, value = item
    detail: JSON = {"error": letter.error, "reason": str(letter.reason), "item_id": item_id}
    conn.execute(
        queries.append_event(
            letter.job_id,
            letter.step,
            EventKind.DEAD_LETTERED,
            key=letter.key,
            attempt=attempts or None,
            duration_ms=letter.duration_ms,
            detail=detail,
        )
    )
    row = _letter_row(letter, job, attempts, first_failed_at)
    row["input"] = {**row["input"], "item_id": item_id, "item": value}
    conn.execute(queries.insert_dead_letter(row))


def _letter_row(
    letter: DeadLetterNote, job: Row[Any], attempts: int, first_failed_at: datetime | None
) -> dict[str, Any]:
    """A dead letter's row: the note, and the job's input (its context and results)."""
    error = letter.error if isinstance(letter.error, dict) else {"message": str(letter.error)}
    return {
        "job_id": letter.job_id,
        "pipeline": job.pipeline,
        "step": letter.step,
        "key": letter.key,
        "state": str(DeadLetterState.OPEN),
        "reason": str(letter.reason),
        "error_type": str(error.get("type", "Error"))[:200],
        "message": str(error.get("message", "")),
        "traceback": error.get("traceback") if isinstance(error.get("traceback"), str) else None,
        "input": {"context": job.context, "results": job.results},
        "attempts": attempts,
        "first_failed_at": first_failed_at if first_failed_at is not None else db.utcnow(),
        "last_failed_at": db.utcnow(),
    }


class DeadLetterStore:
    """Dead letters over one engine. Each operation on one dead letter is one transaction, and
    only an open dead letter can be closed, so doing anything twice does it once.

    Args:
        engine: where the ledger lives.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine

    def list(
        self,
        *,
        state: DeadLetterState | None = DeadLetterState.OPEN,
        step: str | None = None,
        error_type: str | None = None,
        failed_before: datetime | None = None,
        failed_after: datetime | None = None,
        ids: Sequence[int] | None = None,
        job_id: UUID | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, oldest failure first (open ones unless `state` says otherwise)."""
        query = queries.select_dead_letters(
            state=state,
            step=step,
            error_type=error_type,
            failed_before=failed_before,
            failed_after=failed_after,
            ids=ids,
            job_id=job_id,
            limit=limit,
        )
        with db.single_statement(self.engine) as conn:
            return [dead_letter_from_row(row) for row in conn.execute(query).mappings()]

    def get(self, letter_id: int) -> DeadLetter:
        """One dead letter.

        Raises:
            DeadLetterNotFound: no dead letter has that id.
        """
        found = self.list(state=None, ids=[letter_id])
        if not found:
            raise DeadLetterNotFound(letter_id)
        return found[0]

    def count_open(self) -> int:
        """How many dead letters wait for a person."""
        with db.single_statement(self.engine) as conn:
            return int(conn.execute(queries.count_open_dead_letters()).scalar_one())

    def replay(
        self, letter_id: int, *, by: str, allow_unknown: bool, event: EventKind = EventKind.REPLAYED
    ) -> Reopened | Refused:
        """Close an open dead letter and put its job back to running at the failed step, whose
        key gets a fresh attempt count. The caller then sends that step.

        Args:
            letter_id: the dead letter.
            by: who asked, for the history.
            allow_unknown: whether a key in state `unknown` may run again (`--force`).
            event: what the history says happened (a replay, or a person's `retry` decision).
        """
        try:
            with db.transaction(self.engine) as conn:
                letter = _close(conn, letter_id, DeadLetterState.REPLAYED, by)
                allowed = [StepState.FAILED] + ([StepState.UNKNOWN] if allow_unknown else [])
                if letter.key is not None:
                    reset = conn.execute(queries.reset_entry(letter.key, from_states=allowed))
                    if reset.one_or_none() is None:
                        _refuse_unless_claimable(conn, letter.key)
                item = item_letters.item_of(conn, letter.job_id, letter.step, letter.key)
                item_id = None
                if item is not None and letter.key is not None:
                    item_id = item_letters.reopen(conn, letter.job_id, letter.step, letter.key)
                if (
                    item_id is None
                    and conn.execute(queries.reopen_job(letter.job_id, letter.step)).one_or_none()
                    is None
                ):
                    raise Refusal("its job is no longer dead-lettered")
                detail: dict[str, JSON] = {"by": by, "dead_letter": letter_id}
                if event is EventKind.RESOLVED:
                    detail["as"] = "retry"
                conn.execute(
                    queries.append_event(
                        letter.job_id, letter.step, event, key=letter.key, detail=detail
                    )
                )
        except Refusal as refusal:
            return Refused(letter_id, str(refusal))
        return Reopened(letter_id, letter.job_id, letter.pipeline, letter.step, item_id)

    def item_sent(self, job_id: UUID, step: str, key: str) -> None:
        """A replayed item's message is with the broker: take it out of the outbox (a replay
        leaves it there, so that the sweeper sends it if its send fails)."""
        with db.single_statement(self.engine) as conn:
            conn.execute(queries.mark_items_dispatched(job_id, step, [key]))

    def settle(
        self, letter_id: int, *, by: str, result: JSON, next_step: str | None
    ) -> Settled | Refused:
        """A person says the dead letter's step did take effect: record `result` as its outcome
        and move the job on to `next_step` (the caller sends it). An item's letter settles the
        item as done instead (its job goes on; moved on to `next_step` if that joined the
        map), refused once the map joined."""
        item_id: str | None = None
        try:
            with db.transaction(self.engine) as conn:
                letter = _close(conn, letter_id, DeadLetterState.RESOLVED, by)
                item = item_letters.item_of(conn, letter.job_id, letter.step, letter.key)
                if item is not None and letter.key is not None:
                    item_id, now, joined = item_letters.resolve_done(
                        conn, letter.job_id, letter.step, letter.key, result, next_step
                    )
                    state: str | None = now
                    next_step = next_step if joined else None
                elif letter.key is None or (
                    conn.execute(
                        queries.settle_entry(letter.key, result, letter.job_id)
                    ).one_or_none()
                    is None
                ):
                    raise Refusal("its step has no failed or unknown key of its job's to settle")
                else:
                    moved = queries.move_dead_job_on(letter.job_id, letter.step, result, next_step)
                    state = conn.execute(moved).scalar_one_or_none()
                    if state is None:
                        raise Refusal(f"its job is not dead-lettered at {letter.step}")
                detail: dict[str, JSON] = {
                    "by": by,
                    "as": "succeeded",
                    "dead_letter": letter_id,
                    "result": result,
                }
                if item_id is not None:
                    detail["item_id"] = item_id
                conn.execute(
                    queries.append_event(
                        letter.job_id,
                        letter.step,
                        EventKind.RESOLVED,
                        key=letter.key,
                        detail=detail,
                    )
                )
        except Refusal as refusal:
            return Refused(letter_id, str(refusal))
        settled = JobState(str(state))
        return Settled(letter_id, letter.job_id, letter.pipeline, settled, next_step, item_id)

    def purge(self, letter_ids: Sequence[int], *, by: str) -> Purged:
        """Delete dead letters; the job of an open one is given up (cancelled) if it is still
        dead-lettered at that letter's step, so retention may remove it later. An item's open
        letter leaves its job as it is, and is refused while the map waits for its item."""
        refused: list[Refused] = []
        with db.transaction(self.engine) as conn:
            found = conn.execute(queries.select_dead_letters(state=None, ids=letter_ids))
            items: dict[int, RowMapping | None] = {}
            for row in found.mappings().all():
                item = item_letters.item_of(conn, row["job_id"], row["step"], row["key"])
                items[row["id"]] = item
                refusal = (
                    item_letters.purge_refusal(conn, row["job_id"], item)
                    if item is not None and row["state"] == DeadLetterState.OPEN
                    else None
                )
                if refusal is not None:
                    refused.append(Refused(row["id"], refusal))
            kept = {each.letter_id for each in refused}
            chosen = [letter_id for letter_id in items if letter_id not in kept]
            deleted = conn.execute(queries.delete_dead_letters(chosen)).mappings().all()
            for row in deleted:
                job_id: UUID = row["job_id"]
                if row["state"] != DeadLetterState.OPEN:
                    continue
                item = items[row["id"]]
                detail: JSON = (
                    {"by": by} if item is None else {"by": by, "item_id": item["item_id"]}
                )
                if item is None and (
                    conn.execute(queries.give_up_dead_job(job_id, row["step"])).one_or_none()
                    is None
                ):
                    continue
                purged = queries.append_event(
                    job_id, str(row["step"]), EventKind.PURGED, detail=detail
                )
                conn.execute(purged)
        return Purged(len(deleted), refused)


class _Closed:
    def __init__(self, row: RowMapping) -> None:
        self.job_id: UUID = row["job_id"]
        self.step: str = row["step"]
        self.key: str | None = row["key"]
        self.pipeline: str = row["pipeline"]


def _close(conn: Connection, letter_id: int, state: DeadLetterState, by: str) -> _Closed:
    row = conn.execute(queries.close_dead_letter(letter_id, state, by)).mappings().one_or_none()
    if row is None:
        found = (
            conn.execute(queries.select_dead_letters(state=None, ids=[letter_id]))
            .mappings()
            .one_or_none()
        )
        if found is None:
            raise DeadLetterNotFound(letter_id)
        raise Refusal(f"it is {found['state']}, not open")
    return _Closed(row)


def _refuse_unless_claimable(conn: Connection, key: str) -> None:
    entry = conn.execute(queries.select_entry(key)).mappings().one_or_none()
    if entry is None or entry["state"] == StepState.SUCCEEDED:
        return  # never claimed, or done since: the step's claim will sort it out
    if entry["state"] == StepState.UNKNOWN:
        raise Refusal("its step's outcome is unknown: check the provider, then --force or resolve")
    raise Refusal(f"its step's key is {entry['state']}")


def dead_letter_from_row(row: RowMapping) -> DeadLetter:
    """A `DeadLetter` from a `dead_letters` row."""
    return DeadLetter(
        id=row["id"],
        job_id=row["job_id"],
        pipeline=row["pipeline"],
        step=row["step"],
        key=row["key"],
        state=DeadLetterState(row["state"]),
        reason=DeadLetterReason(row["reason"]),
        error_type=row["error_type"],
        message=row["message"],
        traceback=row["traceback"],
        input=row["input"],
        attempts=row["attempts"],
        first_failed_at=db.as_utc(row["first_failed_at"]),
        last_failed_at=db.as_utc(row["last_failed_at"]),
        closed_at=db.as_utc(row["closed_at"]),
        closed_by=row["closed_by"],
    )
