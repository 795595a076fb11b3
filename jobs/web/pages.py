"""The pages for people: server-rendered HTML (Jinja2, no JavaScript) behind a login with the
API token — home with charts, jobs and their timelines, dead letters with replay and resolve."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, PackageLoader, StrictUndefined

from config import Settings
from jobs.ops.dead_letters import DeadLetterDesk, ReplayResult, letter_view
from jobs.ops.history import history_view
from jobs.pipelines import registry
from jobs.web.charts import throughput_charts
from jobs.web.http import Intake, IntakeDep, cookie_secure, get_intake
from ledger import (
    JSON,
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterReason,
    DeadLetterState,
    JobNotFound,
    JobState,
    LedgerStats,
)

logger = logging.getLogger(__name__)

#: The session cookie's name.
COOKIE: Final = "oncelery_session"
#: The salt of the session cookie's signature.
SALT: Final = "oncelery-session"
#: How long a session lasts, in seconds.
SESSION_MAX_AGE: Final = 12 * 3600
#: The charts' window, in minutes.
CHART_MINUTES: Final = 60
#: Rows at most in a list.
MAX_ROWS: Final = 500
#: No script, no frames, forms only to ourselves: the pages need nothing else.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    """Raised when a page is asked for without a valid session; answered with a redirect."""

    def __init__(self, after: str) -> None:
        self.after = after
        super().__init__(f"log in to see {after}")


class PageError(Exception):
    """Raised to answer a page request with an error page of status `status`."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Session:
    """A signed-in person's session, known here by the CSRF token derived from its id."""

    csrf: str


class PageRoute(APIRoute):
    """A route answering in HTML: a missing session redirects to the login page, a `PageError`
    renders the error page (the app's own handlers answer JSON, for the API)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, wrapped."""
        handle = super().get_route_handler()

        async def handle_page(request: Request) -> Response:
            try:
                response = await handle(request)
            except LoginRequired as exc:
                query = "" if exc.after == "/" else f"?{urlencode({'next': exc.after})}"
                response = RedirectResponse(f"/login{query}", status_code=303)
            except PageError as exc:
                title, session = f"Error {exc.status}", current_session(request)
                response = render("error.html", session, title, exc.status, message=exc.message)
            response.headers.update(SECURITY_HEADERS)
            return response

        return handle_page


#: Mounted by `jobs.web.intake.create_app`.
router = APIRouter(route_class=PageRoute)


# --- sessions ------------------------------------------------------------------------------
# A session is a signed cookie whose key derives from the API token, so rotating the token ends
# every session; a form that changes something carries a CSRF token tied to the session.
def _api_token(settings: Settings) -> bytes:
    return settings.api_token.get_secret_value().encode() if settings.api_token else b""


def _session_key(token: bytes) -> bytes:
    # Derived from the API token: rotating the token invalidates every session and CSRF token.
    return hmac.new(token, b"oncelery pages session v1", hashlib.sha256).digest()


def current_session(request: Request) -> Session | None:
    """The request's session, if its cookie is signed with the current key and not expired."""
    token, cookie = _api_token(get_intake(request).settings), request.cookies.get(COOKIE)
    if not token or not cookie:
        return None
    key = _session_key(token)
    try:
        data = URLSafeTimedSerializer(key, SALT).loads(cookie, max_age=SESSION_MAX_AGE)
    except BadSignature:  # also SignatureExpired
        return None
    sid = data.get("sid") if isinstance(data, dict) else None
    if not isinstance(sid, str):
        return None
    return Session(hmac.new(key, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest())


def require_session(request: Request) -> Session:
    """The session, or a redirect to the login page (which comes back here afterwards)."""
    session = current_session(request)
    if session is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(here if request.method == "GET" else "/")
    return session


SessionDep = Annotated[Session, Depends(require_session)]


def require_csrf(session: SessionDep, csrf: Annotated[str, Form()] = "") -> Session:
    """The session, if the form carries its CSRF token (compared in constant time)."""
    if not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        raise PageError(403, "This form is stale or did not come from these pages: reload it.")
    return session


CsrfDep = Annotated[Session, Depends(require_csrf)]


def _safe_after(after: str) -> str:
    # Only a path on this site: `//host` and `/\host` would send the person elsewhere.
    if not after.startswith("/") or after.startswith(("//", "/\\")) or not after.isprintable():
        return "/"
    return after


# --- rendering -----------------------------------------------------------------------------
def _when(value: object) -> str:
    if value is None:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite keeps UTC, naive
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


_templates = Environment(
    loader=PackageLoader("jobs.web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_pretty = functools.partial(json.dumps, indent=2, ensure_ascii=False, default=str)
_templates.filters.update(pretty=_pretty, when=_when, ms=_ms)
_templates.globals.update(job_states=list(JobState), letter_states=[*DeadLetterState, "all"])


def render(
    template: str, session: Session | None, title: str, status: int = 200, **context: object
) -> HTMLResponse:
    """A page from `jobs/web/templates/` (everything it shows is escaped)."""
    html = _templates.get_template(template).render(session=session, title=title, **context)
    return HTMLResponse(html, status_code=status)


# --- login ---------------------------------------------------------------------------------
def _login_page(settings: Settings, after: str, message: str | None, status: int) -> HTMLResponse:
    context = {"configured": bool(_api_token(settings)), "after": _safe_after(after)}
    return render("login.html", None, "Log in", status, message=message, **context)


@router.get("/login")
def login_form(
    request: Request, intake: IntakeDep, after: Annotated[str, Query(alias="next")] = "/"
) -> Response:
    """The login form (or straight on, for someone signed in)."""
    if current_session(request) is not None:
        return RedirectResponse(_safe_after(after), status_code=303)
    return _login_page(intake.settings, after, None, 200)


@router.post("/login")
def login(
    request: Request,
    intake: IntakeDep,
    token: Annotated[str, Form()] = "",
    after: Annotated[str, Form(alias="next")] = "/",
) -> Response:
    """Check the API token (constant time) and start a session."""
    expected = _api_token(intake.settings)
    if not expected or not token or not hmac.compare_digest(token.encode(), expected):
        logger.warning("pages: a login with a wrong token", extra={"action": "login_refused"})
        return _login_page(intake.settings, after, "That is not the API token.", 401)
    session = {"sid": secrets.token_urlsafe(16)}
    cookie = URLSafeTimedSerializer(_session_key(expected), SALT).dumps(session)
    response = RedirectResponse(_safe_after(after), status_code=303)
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
    """Jobs by state, open dead letters, the oldest pending job, the last hour in charts."""
    stats = LedgerStats(engine=intake.runtime.engine)
    window = CHART_MINUTES * 60.0
    snapshot = stats.snapshot(window=window)
    completed, p99 = stats.per_minute(window=window)
    charts = throughput_charts(completed, p99, end=datetime.now(UTC), minutes=CHART_MINUTES)
    return render("home.html", session, "oncelery", snapshot=snapshot, charts=charts)


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


# --- dead letters --------------------------------------------------------------------------
def _letter(intake: Intake, letter_id: str) -> DeadLetter:
    try:
        return intake.letters.get(int(letter_id))
    except (ValueError, DeadLetterNotFound):
        raise PageError(404, f"there is no dead letter {letter_id}") from None


def _desk(intake: Intake) -> DeadLetterDesk:
    return DeadLetterDesk(
        store=intake.runtime.store, letters=intake.letters, dispatch=intake.dispatch
    )


def _who(name: str) -> str:
    name = " ".join(name.split())[:64]
    return f"ui:{name}" if name else "ui"


@router.get("/ui/dead-letters")
def dead_letters_page(session: SessionDep, intake: IntakeDep, state: str = "open") -> HTMLResponse:
    """Dead letters of one state (open by default) or all, oldest failure first."""
    if state not in {*DeadLetterState, "all"}:
        raise PageError(400, f"there is no dead letter state {state!r}")
    wanted = None if state == "all" else DeadLetterState(state)
    letters = intake.letters.list(state=wanted, limit=MAX_ROWS)
    return render("dead_letters.html", session, "Dead letters", letters=letters, state=state)


@router.get("/ui/dead-letters/{letter_id}")
def dead_letter_page(letter_id: str, session: SessionDep, intake: IntakeDep) -> HTMLResponse:
    """One dead letter: its error, traceback, input and attempts, and what can be done."""
    letter = _letter(intake, letter_id)
    is_open = letter.state is DeadLetterState.OPEN
    desk = _desk(intake)
    unknown = letter.reason is DeadLetterReason.OUTCOME_UNKNOWN or desk.outcome_unknown(letter)
    title, view = f"Dead letter {letter.id}", letter_view(letter)
    return render("dead_letter.html", session, title, letter=view, is_open=is_open, unknown=unknown)


@router.get("/ui/dead-letters/{letter_id}/plan")
def plan_page(
    letter_id: str, session: SessionDep, intake: IntakeDep, force: bool = False
) -> HTMLResponse:
    """What a replay would do (changes nothing); the replay button is only here."""
    letter = _letter(intake, letter_id)
    plan = _desk(intake).plan(letter, force=force)
    title = f"Replay plan: dead letter {letter.id}"
    return render("plan.html", session, title, plan=plan, force=force)


@router.post("/ui/dead-letters/{letter_id}/replay")
def replay(
    letter_id: str,
    session: CsrfDep,
    intake: IntakeDep,
    force: Annotated[bool, Form()] = False,
    by: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Replay a dead letter: its job resumes at the failed step, on the retry queue."""
    letter = _letter(intake, letter_id)
    result = _desk(intake).replay(letter, by=_who(by), force=force)
    return _outcome(session, "Replay", result)


@router.post("/ui/dead-letters/{letter_id}/resolve")
def resolve(
    letter_id: str,
    session: CsrfDep,
    intake: IntakeDep,
    decision: Annotated[str, Form(alias="as")] = "",
    result: Annotated[str, Form()] = "",
    by: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Record a person's decision about a step whose outcome is unknown: it took effect
    (`as=succeeded`, with an optional JSON result) or it did not (`as=retry`)."""
    letter = _letter(intake, letter_id)
    person = _who(by)
    if decision == "retry":
        if result.strip():
            raise PageError(422, "a result goes with “it took effect”, not with “run it again”")
        return _outcome(session, "Resolve", _desk(intake).retry(letter, by=person))
    if decision != "succeeded":
        raise PageError(422, "choose whether the step took effect (succeeded) or not (retry)")
    outcome: JSON = {"resolved_by": person}
    if result.strip():
        try:
            outcome = json.loads(result)
        except json.JSONDecodeError as exc:
            raise PageError(422, f"the result is not JSON ({exc.msg})") from None
        except RecursionError:
            raise PageError(422, "the result is not JSON we can read (nested too deep)") from None
    return _outcome(session, "Resolve", _desk(intake).resolve(letter, by=person, result=outcome))


def _outcome(session: Session, action: str, result: ReplayResult) -> HTMLResponse:
    title, status = f"{action}: dead letter {result.letter_id}", 200 if result.done else 409
    return render("outcome.html", session, title, status, result=result)
