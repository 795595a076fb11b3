"""A map step's items as the read API and the items page show them: a page at a time in item
order (keyset: `after` is the last item's path), filtered by state, each with its key's state,
attempts, value, result or error, and its dead letter."""

from __future__ import annotations

from typing import Final
from uuid import UUID

from ledger import JSON, ItemState, JobNotFound, JobStore
from ledger.map_views import ItemRow, ItemsPage, MapViews

#: Items per page unless asked otherwise, and at most.
PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 500
#: The longest cursor: an item's path is at most this long (`map_items.path`).
MAX_AFTER: Final = 1000


class BadItemsQuery(Exception):
    """Raised when a query's filter or cursor is not one we can read (a 422)."""


class NoSuchMap(Exception):
    """Raised when there is no such job, or the job has no map at that step (a 404)."""


def item_state(value: str) -> ItemState | None:
    """The state filter: empty for every state.

    Raises:
        BadItemsQuery: naming the states there are.
    """
    if not value:
        return None
    try:
        return ItemState(value)
    except ValueError:
        states = ", ".join(str(state) for state in ItemState)
        raise BadItemsQuery(f"there is no item state {value!r} (one of {states})") from None


def items_page(
    store: JobStore,
    views: MapViews,
    job_id: str,
    step: str,
    *,
    state: str = "",
    after: str = "",
    limit: int = PAGE_SIZE,
) -> ItemsPage:
    """One page of a job's map at `step`.

    Raises:
        NoSuchMap: no job `job_id`, or it has no map at `step` (not a map step of its plan,
            or not fanned out yet).
        BadItemsQuery: an unknown state or an unreadable cursor.
    """
    wanted = item_state(state)
    if len(after) > MAX_AFTER or not after.isprintable():
        raise BadItemsQuery("after must be the cursor of a next link")
    try:
        job = store.get_job(UUID(job_id))
    except (ValueError, JobNotFound):
        raise NoSuchMap(f"there is no job {job_id}") from None
    if step not in job.step_keys:
        raise NoSuchMap(f"job {job_id} has no step {step!r}")
    page = views.items(job.id, step, state=wanted, after=after or None, limit=limit)
    if page is None:
        raise NoSuchMap(f"job {job_id} has no map at step {step!r} (yet)")
    return page


def item_view(row: ItemRow) -> dict[str, JSON]:
    """One item as the read API shows it."""
    return {
        "item_id": row.item_id,
        "state": str(row.state),
        "key": row.key,
        "key_state": str(row.key_state) if row.key_state is not None else None,
        "attempts": row.attempts,
        "item": row.item,
        "result": row.result if row.state is ItemState.DONE else None,
        # A pending item's last error too: it is being retried.
        "error": row.error if row.state is not ItemState.DONE else None,
        "children": row.children,
        "dead_letter_id": row.dead_letter_id,
        "updated_at": row.updated_at.isoformat(),
    }


def page_view(job_id: str, step: str, page: ItemsPage) -> dict[str, JSON]:
    """`GET /jobs/{job_id}/steps/{step}/items`'s body."""
    return {
        "job_id": job_id,
        "step": step,
        "items_summary": page.counters.summary(),
        "items": [item_view(row) for row in page.items],
        "next_after": page.next_after,
    }
