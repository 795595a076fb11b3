"""The pages for people: server-rendered HTML (Jinja2, no JavaScript) behind a login with the
API token — home with charts, jobs and their timelines; a map step's items are in `map_pages`,
dead letters with replay and resolve in `letter_pages`."""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import UTC, datetime
from typing import Annotated, Final
from uuid import UUID

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import URLSafeTimedSerializer

from config import Settings
from jobs.ops.history import history_view
from jobs.pipelines import registry
from jobs.web import letter_pages, map_pages
from jobs.web.charts import throughput_charts
from jobs.web.http import IntakeDep, cookie_secure
from jobs.web.rendering import MAX_ROWS, PageRoute, render
from jobs.web.sessions import (
    COOKIE,
    SALT,
    SESSION_MAX_AGE,
    CsrfDep,
    PageError,
    SessionDep,
    api_token,
    current_session,
    safe_after,
    session_key,
)
from ledger import DeadLetter, DeadLetterState, JobNotFound, JobState, LedgerStats
from ledger.map_views import MapViews

logger = logging.getLogger(__name__)

#: The charts' window, in minutes.
CHART_MINUTES: Final = 60

#: Mounted by `jobs.web.intake.create_app`.
router = APIRouter(route_class=PageRoute)


# --- login ---------------------------------------------------------------------------------
def _login_page(settings: Settings, after: str, message: str | None, status: int) -> HTMLResponse:
    context = {"configured": bool(api_token(settings)), "after": safe_after(after)}
    return render("login.html", None, "Log in", status, message=message, **context)


@router.get("/login")
def login_form(
    request: Request, intake: IntakeDep, after: Annotated[str, Query(alias="next")] = "/"
) -> Response:
    """The login form (or straight on, for someone signed in)."""
    if current_session(request) is not None:
        return RedirectResponse(safe_after(after), status_code=303)
    return _login_page(intake.settings, after, None, 200)


@router.post("/login")
def login(
    request: Request,
    intake: IntakeDep,
    token: Annotated[str, Form()] = "",
    after: Annotated[str, Form(alias="next")] = "/",
) -> Response:
    """Check the API token (constant time) and start a session."""
    expected = api_token(intake.settings)
    if not expected or not token or not hmac.compare_digest(token.encode(), expected):
        logger.warning("pages: a login with a wrong token", extra={"action": "login_refused"})
        return _login_page(intake.settings, after, "That is not the API token.", 401)
    session = {"sid": secrets.token_urlsafe(16)}
    cookie = URLSafeTimedSerializer(session_key(expected), SALT).dumps(session)
    response = RedirectResponse(safe_after(after), status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, intake.settings),
    )
    logger.info("pages: signed in", extra={"action": "login"})
    return response


@router.post("/logout")
def logout(request: Request, _session: CsrfDep, intake: IntakeDep) -> Response:
    """End the session (this browser's cookie; rotate API_TOKEN to end every session)."""
    response = RedirectResponse("/login", status_code=303)
    # With the attributes it was set with: a browser keeps a Secure cookie that a response
    # without them tries to remove.
    secure = cookie_secure(request, intake.settings)
    response.delete_cookie(COOKIE, httponly=True, samesite="lax", secure=secure)
    return response


# --- jobs ----------------------------------------------------------------------------------
@router.get("/")
def home(session: SessionDep, intake: IntakeDep) -> HTMLResponse:
    """Jobs by state, open dead letters, the oldest pending job, the maps in progress, the
    last hour in charts."""
    stats = LedgerStats(engine=intake.runtime.engine)
    window = CHART_MINUTES * 60.0
    snapshot = stats.snapshot(window=window)
    completed, p99 = stats.per_minute(window=window)
    charts = throughput_charts(completed, p99, end=datetime.now(UTC), minutes=CHART_MINUTES)
    maps = MapViews(engine=intake.runtime.engine).in_progress()
    return render("home.html", session, "oncelery", snapshot=snapshot, charts=charts, maps=maps)


@router.get("/ui/jobs")
def jobs_page(
    session: SessionDep,
    intake: IntakeDep,
    state: str = "",
    pipeline: str = "",
    order_id: str = "",
    limit: Annotated[int, Query(ge=1, le=MAX_ROWS)] = 50,
) -> HTMLResponse:
    """Recent jobs, newest first, filtered by state and pipeline and searched by order id."""
    try:
        wanted = JobState(state) if state else None
    except ValueError:
        raise PageError(400, f"there is no job state {state!r}") from None
    if pipeline and pipeline not in registry:
        raise PageError(404, f"there is no pipeline {pipeline!r}")
    order_id, store = order_id.strip(), intake.runtime.store
    jobs = store.list_jobs(
        state=wanted, limit=limit, pipeline=pipeline or None, order_id=order_id or None
    )
    names = sorted(declared.name for declared in registry)
    filters = {"state": state, "pipeline": pipeline, "order_id": order_id}
    return render("jobs.html", session, "Jobs", jobs=jobs, pipelines=names, filters=filters)


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str, session: SessionDep, intake: IntakeDep) -> HTMLResponse:
    """One job's timeline: each step's attempts, input, output, error, duration and events."""
    try:
        history = intake.runtime.store.history(UUID(job_id))
    except (ValueError, JobNotFound):
        raise PageError(404, f"there is no job {job_id}") from None
    letters: list[DeadLetter] = []
    if history.job.state is JobState.DEAD_LETTERED:
        letters = intake.letters.list(state=DeadLetterState.OPEN, job_id=history.job.id)
    view, order = history_view(history), history.job.context.get("order_id")
    return render("job.html", session, f"Job {job_id}", job=view, order_id=order, letters=letters)


router.include_router(letter_pages.router)
router.include_router(map_pages.router)
