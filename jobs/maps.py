"""The public API of a map step (fan-out and fan-in): a step whose run produces items, each
then claimed, acted on and recorded as a unit of its own, which may expand into more items;
the step after it (the join) runs once, when every item is settled."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic

from jobs.pipelines import R, Step, StepContext
from ledger import JSON, ItemResult, NewItem

__all__ = ["Expand", "ItemContext", "ItemResult", "MapPolicy", "MapStep"]


class MapPolicy(enum.StrEnum):
    """When a map's join runs, given failed items."""

    #: Every item must succeed: a failed item is dead-lettered on its own and the join waits
    #: (the other items go on); replaying the item lets the join run.
    ALL_SUCCEED = "all_succeed"
    #: A failed item is dead-lettered and settled: the join runs once every item is done or
    #: failed, and reads the failures with the results.
    ALL_SETTLED = "all_settled"
    #: Up to `max_failed` failed items settle (as `ALL_SETTLED`); any failure past them
    #: waits for a person (as `ALL_SUCCEED`).
    THRESHOLD = "threshold"


@dataclass(frozen=True)
class Expand:
    """What an item's act returns to split into more items: its own `result`, and the
    `items` to add to the map (each claimed, acted on and recorded like any item; an item
    the map has already, the same id and content, is not added again; an id it has with
    other content fails the item that returned it)."""

    items: Sequence[JSON]
    result: JSON = None


@dataclass(frozen=True)
class ItemContext(Generic[R]):
    """What a map step's `each` function receives for one item."""

    job_id: str
    pipeline: str
    step: str
    #: The item's idempotency key: pass it to the provider.
    key: str
    #: This attempt's number, from 1.
    attempt: int
    item_id: str
    item: JSON
    #: The job's input, as enqueued.
    context: Mapping[str, JSON]
    #: The recorded results of the steps before the map step.
    results: Mapping[str, JSON]
    resources: R


@dataclass(frozen=True, kw_only=True)
class MapStep(Step[R]):
    """A step that fans out: its `run` returns the items (a list of JSON values, or an
    iterator of them: a generator's items are written as it yields them, never all held in
    memory), and `each` acts on one item. Every item is a unit of work with its own
    idempotency key (the step's key, "/", the item's id), run on any worker in parallel,
    claimed, acted on and recorded by the step protocol (retries, `unknown`, leases,
    fencing), counted once by the fan-in. `delivery`, `effect`, `retry` and `time_limit` are
    those of each item's act; the step's own run only computes the items (it is claimed and
    recorded, never read-only). A generator runs while its items are written, in the step's
    record (bounded by its message's allowance for the fan-out, not by the step's time
    limit), and what it raises fails the step's attempt as its run's own errors do.

    Args:
        each: acts on one item (`ItemContext`); returns its JSON result, or `Expand` to add
            more items (recorded in the same transaction as the item's result).
        item_id: the identity of an item (not its position): its key is derived from it.
        policy: when the join runs, given failed items (`MapPolicy`).
        max_failed: how many failed items may settle, for `MapPolicy.THRESHOLD` only.
    """

    #: (A step's `run`, which may also return an iterator of items.)
    run: Callable[[StepContext[R]], JSON | Iterator[JSON]] = field(kw_only=False)  # type: ignore[assignment]
    each: Callable[[ItemContext[R]], JSON | Expand]
    item_id: Callable[[JSON], str]
    policy: MapPolicy = MapPolicy.ALL_SUCCEED
    max_failed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        threshold = self.policy is MapPolicy.THRESHOLD
        if threshold and not (isinstance(self.max_failed, int) and self.max_failed >= 0):
            raise ValueError(f"map step {self.name!r}: a threshold needs max_failed >= 0")
        if not threshold and self.max_failed is not None:
            raise ValueError(f"map step {self.name!r}: max_failed is for MapPolicy.THRESHOLD")

    def settled_failures(self) -> int | None:
        """How many failed items settle (None: every one)."""
        if self.policy is MapPolicy.ALL_SETTLED:
            return None
        if self.policy is MapPolicy.THRESHOLD:
            return self.max_failed
        return 0

    def new_items(self, pipeline: str, step_key: str, items: Sequence[JSON]) -> list[NewItem]:
        """The items to add to a map whose step key is `step_key`.

        An item given twice (same id, same content) is one item.

        Raises:
            ValueError: an item id that is not a non-empty string, a key too long for the
                ledger, an item that is not JSON, or one id given with two contents (its
                identity would hide the second).
        """
        added: dict[str, NewItem] = {}
        for new in self.stream_items(pipeline, step_key, items):
            seen = added.setdefault(new.item_id, new)
            if seen.fingerprint != new.fingerprint:
                raise ValueError(
                    f"map step {self.name!r}: item id {new.item_id!r} given twice with other "
                    "content"
                )
        return list(added.values())

    def stream_items(
        self, pipeline: str, step_key: str, items: Iterable[JSON]
    ) -> Iterator[NewItem]:
        """`new_items` as they come, none kept: a repeat is left to the ledger, which writes
        an item once and refuses an id given with two contents (`ItemConflict`).

        Raises:
            ValueError: as `new_items`, for the item that has it.
        """
        for item in items:
            item_id = self.item_id(item)
            if not isinstance(item_id, str) or not item_id:
                raise ValueError(f"map step {self.name!r}: item id {item_id!r} is not a string")
            key = f"{step_key}/{item_id}"
            if len(key) > MAX_KEY:
                raise ValueError(f"map step {self.name!r}: item key {key[:80]!r}… is too long")
            try:
                fingerprint = item_fingerprint(pipeline, self.name, item)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"map step {self.name!r}: item {item_id!r} is not JSON: {exc}"
                ) from None
            yield NewItem(item_id, item, key, fingerprint)


#: The longest idempotency key the ledger stores.
MAX_KEY = 300


def item_fingerprint(pipeline: str, step: str, item: JSON) -> str:
    """A stable hash of an item: its key claimed for another item is a fingerprint mismatch."""
    canonical = json.dumps([pipeline, step, item], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_map(step: Step[object]) -> bool:
    """Whether a step is a map step."""
    return isinstance(step, MapStep)
