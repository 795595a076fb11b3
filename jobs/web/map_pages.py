"""A map step's items page: its progress, then its items a page at a time in item order
(keyset: the next link carries the last item's path), filtered by state."""

from __future__ import annotations

from urllib.parse import quote, urlencode
from uuid import UUID

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from jobs.ops.map_items import BadItemsQuery, NoSuchMap, items_page
from jobs.web.http import IntakeDep
from jobs.web.rendering import PageRoute, render
from jobs.web.sessions import PageError, SessionDep
from ledger import ItemState
from ledger.map_views import MapViews

#: Mounted by `jobs.web.pages`.
router = APIRouter(route_class=PageRoute)


@router.get("/ui/jobs/{job_id}/steps/{step}/items")
def items_page_html(
    job_id: str, step: str, session: SessionDep, intake: IntakeDep, state: str = "", after: str = ""
) -> HTMLResponse:
    """A map's items in item order, a page of `PAGE_SIZE` at a time, of one state if asked."""
    views = MapViews(engine=intake.runtime.engine)
    try:
        page = items_page(intake.runtime.store, views, job_id, step, state=state, after=after)
    except NoSuchMap as exc:
        raise PageError(404, str(exc)) from None
    except BadItemsQuery as exc:
        raise PageError(422, str(exc)) from None
    job_id = str(UUID(job_id))  # as the job's links spell it (the page found the job)
    here = f"/ui/jobs/{job_id}/steps/{quote(step, safe='')}/items"
    filters = {
        name: here + (f"?{urlencode({'state': name})}" if name else "") for name in ("", *ItemState)
    }
    following = None
    if page.next_after is not None:
        query = {"state": state, "after": page.next_after} if state else {"after": page.next_after}
        following = f"{here}?{urlencode(query)}"
    return render(
        "map_items.html",
        session,
        f"Job {job_id}: the items of {step}",
        job_id=job_id,
        step=step,
        items=page.counters.summary(),
        rows=page.items,
        state=state,
        filters=filters,
        first_page=here + (f"?{urlencode({'state': state})}" if state else "") if after else None,
        following=following,
    )
