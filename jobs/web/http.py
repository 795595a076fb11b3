"""What the HTTP handlers (the API in `intake.py`, the pages in `pages.py` and its siblings)
share: the app's state (and its database threads), the bearer-token check, and errors
answered as JSON."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from config import CookieSecurity, Settings
from jobs.engine.enqueue import OutboxRelay
from jobs.engine.runtime import Runtime
from jobs.ops.health import Probe
from jobs.web.job_writer import JobWriter
from jobs.worker import CeleryDispatch
from ledger import DatabaseUnavailable, DeadLetterStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message", ...}}` with a status."""

    def __init__(self, status: int, kind: str, message: str, **extra: object) -> None:
        self.status = status
        self.kind = kind
        self.message = message
        self.extra = extra
        super().__init__(message)


@dataclass
class Intake:
    """What the app's handlers share.

    `database_threads` run the webhook's ledger calls off the event loop, a fixed number of
    them (one Postgres connection each): a hung database holds those threads, never the loop,
    so `/healthz` and every other request still answer.
    """

    settings: Settings
    runtime: Runtime
    letters: DeadLetterStore
    relay: OutboxRelay
    dispatch: CeleryDispatch
    database_threads: ThreadPoolExecutor
    probes: tuple[Probe, ...] = ()
    #: Creates the webhook's jobs in groups, on `database_threads` (set by `create_app`).
    writer: JobWriter = field(init=False)

    @property
    def database_deadline(self) -> float:
        """Seconds a ledger call may take before the request gives up on it: past the
        connect and statement timeouts, Postgres is not answering at all."""
        return self.settings.intake_connect_timeout + self.settings.intake_statement_timeout + 1

    async def in_database(self, call: Callable[[], T]) -> T:
        """`call()` on a database thread, within `database_deadline`.

        Raises:
            ApiError: 503 when the database is unavailable or does not answer in time (the
                call may still complete: a sender sending again gets the same job).
        """
        future = asyncio.get_running_loop().run_in_executor(self.database_threads, call)
        try:
            return await asyncio.wait_for(future, self.database_deadline)
        except TimeoutError:
            detail = f"no answer within {self.database_deadline:g}s"
        except DatabaseUnavailable as exc:
            detail = exc.detail
        logger.warning(
            "intake: database unavailable: %s", detail, extra={"action": "database_unavailable"}
        )
        raise ApiError(
            503, "database_unavailable", "the database is not answering; send the request again"
        )


def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    body = {"error": {"type": exc.kind, "message": exc.message, **exc.extra}}
    return JSONResponse(body, status_code=exc.status)


def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": "http", "message": str(exc.detail)}}, status_code=exc.status_code
    )


def get_intake(request: Request) -> Intake:
    """The app's shared state."""
    intake: Intake = request.app.state.intake
    return intake


IntakeDep = Annotated[Intake, Depends(get_intake)]


def not_configured(variable: str) -> ApiError:
    """The 503 of an endpoint whose secret the server was not given: closed, never open."""
    return ApiError(
        503, "not_configured", f"{variable} is not set on the server: this endpoint is closed"
    )


def require_token(intake: IntakeDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """`Authorization: Bearer <API_TOKEN>`, compared in constant time.

    Raises:
        ApiError: 503 when API_TOKEN is unset, 401 for a missing, empty or wrong token.
    """
    expected = intake.settings.api_token
    if expected is None or not expected.get_secret_value():
        raise not_configured("API_TOKEN")
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if (
        scheme.lower() != "bearer"
        or not token
        or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode())
    ):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


def cookie_secure(request: Request, settings: Settings) -> bool:
    """Whether the session cookie is `Secure`: as configured, or (`auto`) unless the page was
    asked for as localhost or a loopback address. The request's scheme is no guide: behind
    a TLS proxy it is http while the browser's is https."""
    if settings.session_cookie_secure is not CookieSecurity.AUTO:
        return settings.session_cookie_secure is CookieSecurity.TRUE
    host = (request.url.hostname or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
