"""The pages' sessions: a signed cookie whose key derives from the API token (rotating the token
ends every session), the CSRF token of the forms that change something, and the exceptions a
page raises to redirect to the login page or answer an error page."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Form, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from config import Settings
from jobs.web.http import get_intake

#: The session cookie's name.
COOKIE: Final = "oncelery_session"
#: The salt of the session cookie's signature.
SALT: Final = "oncelery-session"
#: How long a session lasts, in seconds.
SESSION_MAX_AGE: Final = 12 * 3600


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


# A session is a signed cookie whose key derives from the API token, so rotating the token ends
# every session; a form that changes something carries a CSRF token tied to the session.
def api_token(settings: Settings) -> bytes:
    return settings.api_token.get_secret_value().encode() if settings.api_token else b""


def session_key(token: bytes) -> bytes:
    # Derived from the API token: rotating the token invalidates every session and CSRF token.
    return hmac.new(token, b"oncelery pages session v1", hashlib.sha256).digest()


def current_session(request: Request) -> Session | None:
    """The request's session, if its cookie is signed with the current key and not expired."""
    token, cookie = api_token(get_intake(request).settings), request.cookies.get(COOKIE)
    if not token or not cookie:
        return None
    key = session_key(token)
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


def safe_after(after: str) -> str:
    # Only a path on this site: `//host` and `/\host` would send the person elsewhere.
    if not after.startswith("/") or after.startswith(("//", "/\\")) or not after.isprintable():
        return "/"
    return after
