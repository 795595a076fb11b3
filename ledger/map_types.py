"""Value objects of a map step's items: a claim of an item, what recording one did, a map's
counters, an item's result as the join reads it. Must not import celery, kombu, jobs or
config."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from ledger.types import (
    JSON,
    AlreadySucceeded,
    Claim,
    InFlight,
    ItemState,
    JobInactive,
    JobState,
    OutcomeUnknown,
)


@dataclass(frozen=True)
class NewItem:
    """An item to add to a map: its identity, its value, its key and its fingerprint."""

    item_id: str
    item: JSON
    key: str
    fingerprint: str


@dataclass(frozen=True)
class ItemClaim(Claim):
    """An item's key is ours until the lease ends: act on `item`, then record with `owner`.
    A `Claim` like a step's, so leases are kept and fenced the same way."""

    item_id: str = ""
    item: JSON = None


@dataclass(frozen=True)
class ItemSettled:
    """The item is done or failed already (None: the map has no such item): nothing to do
    but hand on a join whose publish may have been lost (the job is at `current_step`)."""

    job_id: UUID
    step: str
    item_id: str
    state: ItemState | None
    current_step: str | None = None


#: Everything a claim of an item can answer.
ItemFound = ItemClaim | ItemSettled | AlreadySucceeded | InFlight | OutcomeUnknown | JobInactive


@dataclass(frozen=True)
class MapCounters:
    """A map's fan-in counters."""

    step: str
    policy: str
    total: int
    done: int
    #: Items failed for good: settled, or `waiting` for a person (of which `waiting`).
    failed: int
    waiting: int
    expanded: int
    #: Items not settled yet: pending, or failed and waiting for a person.
    remaining: int
    joined: bool

    @property
    def pending(self) -> int:
        """Items neither done nor failed."""
        return self.total - self.done - self.failed

    def summary(self) -> dict[str, JSON]:
        """The counters as the map step's result and the history show them."""
        return {
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "waiting": self.waiting,
            "pending": self.pending,
            "expanded": self.expanded,
            "joined": self.joined,
        }


@dataclass(frozen=True)
class ItemRecorded:
    """What recording an item's outcome did."""

    key: str
    #: This record was the item's first transition out of pending: it counted.
    counted: bool
    #: The new items its act expanded into, to publish.
    children: list[str] = field(default_factory=list)
    #: Set when this record settled the map's last item: the job's state after moving on to
    #: the join (hand the join on when running).
    joined: JobState | None = None


@dataclass(frozen=True)
class FanOut:
    """What recording a map step's items did."""

    #: How many items were added (0: none, or they were added before).
    added: int
    #: Set when the map had no items at all and the job moved on at once.
    joined: JobState | None = None


@dataclass(frozen=True)
class ItemResult:
    """One item as the join reads it, in item order."""

    item_id: str
    item: JSON
    state: ItemState
    result: JSON
    error: JSON
    #: How many new items its act expanded into.
    children: int


@dataclass(frozen=True)
class LostItem:
    """A pending item the sweeper sends again."""

    job_id: UUID
    pipeline: str
    step: str
    item_id: str
