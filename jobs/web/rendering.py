"""How the pages answer: HTML from `jobs/web/templates/` (Jinja2, escaped, no JavaScript),
security headers on every page, a missing session redirected to the login page and a
`PageError` rendered as an error page."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined

from jobs.web.sessions import LoginRequired, PageError, Session, current_session
from ledger import DeadLetterState, JobState

#: Characters of a value shown in a table cell.
SHORT: Final = 160
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


def _when(value: object) -> str:
    if value is None:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite keeps UTC, naive
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(value: object) -> str:
    # One line, cut: a table row stays a row however big an item is.
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= SHORT else text[: SHORT - 1] + "…"


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
_templates.filters.update(pretty=_pretty, when=_when, ms=_ms, short=_short)
_templates.globals.update(job_states=list(JobState), letter_states=[*DeadLetterState, "all"])


def render(
    template: str, session: Session | None, title: str, status: int = 200, **context: object
) -> HTMLResponse:
    """A page from `jobs/web/templates/` (everything it shows is escaped)."""
    html = _templates.get_template(template).render(session=session, title=title, **context)
    return HTMLResponse(html, status_code=status)
