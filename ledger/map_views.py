"""`MapViews`: map steps as people read them — the maps in progress summed per pipeline and
step, the joined maps counted, one map's items a page at a time (keyset, in item order,
filtered by state). Read-only. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from sqlalchemy.engine import Engine, RowMapping

from ledger import db
from ledger.map_counters import counters_of
from ledger.map_types import MapCounters
from ledger.queries import map_views as statements
from ledger.types import ACTIVE_JOB_STATES, JSON, DeadLetterState, ItemState, StepState


@dataclass(frozen=True)
class MapProgress:
    """The unjoined maps of active jobs at one pipeline's map step, their counters summed."""

    pipeline: str
    step: str
    maps: int
    total: int
    done: int
    failed: int
    waiting: int
    expanded: int

    @property
    def pending(self) -> int:
        """Items neither done nor failed."""
        return self.total - self.done - self.failed

    def summary(self) -> dict[str, JSON]:
        """The figures as `status --json` shows them."""
        return {
            "maps": self.maps,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "waiting": self.waiting,
            "pending": self.pending,
            "expanded": self.expanded,
        }


@dataclass(frozen=True)
class ItemRow:
    """One item of a map, with its key's entry (None before its first claim) and, when it
    failed, the id of its dead letter (the open one, else the newest)."""

    item_id: str
    path: str
    state: ItemState
    item: JSON
    key: str
    children: int
    updated_at: datetime
    key_state: StepState | None
    attempts: int
    result: JSON
    error: JSON
    dead_letter_id: int | None


@dataclass(frozen=True)
class ItemsPage:
    """A page of a map's items; `next_after` is the cursor of the next page (None: last)."""

    counters: MapCounters
    items: list[ItemRow]
    next_after: str | None


@dataclass(frozen=True)
class MapMismatch:
    """A map whose ledger rows disagree: what the audit reports as drift."""

    job_id: UUID
    pipeline: str
    step: str
    problems: list[str]


#: Each counter of `maps`, and what its items say it should be.
_COUNTERS = (
    ("total", "items"),
    ("done", "items_done"),
    ("failed", "items_failed"),
    ("waiting", "items_waiting"),
    ("remaining", "items_open"),
    ("expanded", "items_expanded"),
)


def _mismatch(row: RowMapping) -> MapMismatch:
    problems = [
        f"counter {counter}={row[counter]} but its items say {row[said]}"
        for counter, said in _COUNTERS
        if row[counter] != row[said]
    ]
    waits_at_map = row["job_state"] in ACTIVE_JOB_STATES and row["current_step"] == row["step"]
    if row["joined_at"] is not None and row["remaining"] != 0:
        problems.append(f"joined with {row['remaining']} items not settled")
    if row["joined_at"] is not None and waits_at_map:
        problems.append("joined, but its job still waits at the map")
    if row["joined_at"] is None and row["remaining"] == 0 and waits_at_map:
        problems.append("every item settled, but not joined")
    return MapMismatch(row["job_id"], str(row["pipeline"]), str(row["step"]), problems)


#: The item states a dead letter goes with.
_FAILED = (ItemState.FAILED.value, ItemState.WAITING.value)


class MapViews:
    """Reads map steps for `status`, the metrics and the pages.

    Args:
        engine: where the ledger lives.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.engine = engine

    def in_progress(self) -> list[MapProgress]:
        """Per pipeline and map step, the maps of active jobs not joined yet, summed."""
        with db.transaction(self.engine) as conn:
            rows = conn.execute(statements.sum_unjoined_maps()).mappings().all()
        return [
            MapProgress(
                row["pipeline"],
                row["step"],
                int(row["maps"]),
                *(int(row[name]) for name in ("total", "done", "failed", "waiting", "expanded")),
            )
            for row in rows
        ]

    def mismatched(self) -> list[MapMismatch]:
        """Maps whose counters disagree with their items, joined with items still open,
        joined while their job still waits at them, or settled and not joined."""
        with db.transaction(self.engine) as conn:
            rows = conn.execute(statements.select_mismatched_maps()).mappings().all()
        return [_mismatch(row) for row in rows]

    def joined(self) -> dict[tuple[str, str], int]:
        """Per (pipeline, map step), how many maps have joined."""
        with db.transaction(self.engine) as conn:
            rows = conn.execute(statements.count_joined_maps()).all()
        return {(row.pipeline, row.step): int(row.maps) for row in rows}

    def items(
        self,
        job_id: UUID,
        step: str,
        *,
        state: ItemState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> ItemsPage | None:
        """Up to `limit` items of a job's map at `step` in item order, after the cursor
        `after`, of one state if given (None when the job has no map at `step`)."""
        with db.transaction(self.engine) as conn:
            found = conn.execute(statements.select_map(job_id, step)).mappings().one_or_none()
            if found is None:
                return None
            if db.is_postgres(self.engine):
                conn.execute(statements.walk_in_order())
            query = statements.select_item_rows(job_id, step, state, after, limit + 1)
            rows = conn.execute(query).mappings().all()
            more, rows = len(rows) > limit, rows[:limit]
            failed = [r["key"] for r in rows if r["state"] in _FAILED]
            letters: dict[str, tuple[bool, int]] = {}
            if failed:
                for letter in conn.execute(statements.select_letters_of_keys(job_id, failed)):
                    # The open letter wins; among closed ones, the newest.
                    found_one = (letter.state == DeadLetterState.OPEN, int(letter.id))
                    letters[letter.key] = max(letters.get(letter.key, found_one), found_one)
        items = [
            ItemRow(
                item_id=row["item_id"],
                path=row["path"],
                state=ItemState(row["state"]),
                item=row["item"],
                key=row["key"],
                children=int(row["children"]),
                updated_at=row["updated_at"],
                key_state=StepState(row["key_state"]) if row["key_state"] is not None else None,
                attempts=int(row["attempts"] or 0),
                result=row["result"],
                error=row["error"],
                dead_letter_id=letters[row["key"]][1] if row["key"] in letters else None,
            )
            for row in rows
        ]
        next_after = items[-1].path if more and items else None
        return ItemsPage(counters_of(step, found), items, next_after)
