"""What the HTTP handlers (the API in `intake.py`, the pages in `pages.py` and its siblings)
share: the app's state (and its database threads), the bearer-token check, and errors
answered as JSON."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from config import CookieSecurity, Settings
from jobs.engine.enqueue import OutboxRelay
from jobs.engine.runtime import Runtime
from jobs.ops.health import Probe
from jobs.ops.signatures import sign
from jobs.web.job_writer import JobWriter
from jobs.worker import CeleryDispatch
from ledger import DatabaseUnavailable, DeadLetterStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The largest signed body accepted (an event's 100 items fit in a few kilobytes).
MAX_BODY_BYTES: Final = 64 * 1024
#: How far a signed request's timestamp may be from our clock, in seconds (replays of old
#: requests).
SIGNATURE_TOLERANCE: Final = 300
#: The most digits a number in a header may have (unix seconds have 10; a body size fewer).
_MAX_DIGITS: Final = 12


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
    # Its headers too: a 405's `Allow` says which methods the path takes.
    return JSONResponse(
        {"error": {"type": "http", "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request whose path, query or headers FastAPI refused: 422 in the one error shape,
    naming each field (`query.limit`)."""
    fields = [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
        for error in exc.errors()
    ]
    message = "; ".join(f"{field['field']}: {field['message']}" for field in fields)
    return JSONResponse(
        {"error": {"type": "invalid_request", "message": message, "fields": fields}},
        status_code=422,
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


#: Reads `Authorization: Bearer …` and documents the scheme (`securitySchemes`); a missing or
#: malformed header is None, answered by `require_token` in the one error shape.
_BEARER: Final = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <API_TOKEN>`"
)


def require_token(
    intake: IntakeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """`Authorization: Bearer <API_TOKEN>`, compared in constant time.

    Raises:
        ApiError: 503 when API_TOKEN is unset, 401 for a missing, empty or wrong token.
    """
    expected = intake.settings.api_token
    if expected is None or not expected.get_secret_value():
        raise not_configured("API_TOKEN")
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token or not hmac.compare_digest(
        token.encode("utf-8", "replace"), expected.get_secret_value().encode()
    ):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


def reject_unknown_query(request: Request) -> None:
    """Refuse query parameters the operation does not declare in the OpenAPI schema (a typo,
    `?stat=running`, would otherwise be ignored and answer something else).

    Raises:
        ApiError: 422 naming each unknown parameter.
    """
    if not request.query_params:
        return
    path = getattr(request.scope.get("route"), "path", "")
    operation = request.app.openapi()["paths"].get(path, {}).get(request.method.lower(), {})
    known = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError(
            422,
            "invalid_request",
            "unknown query parameter(s): " + ", ".join(repr(name) for name in unknown),
            fields=[{"field": f"query.{name}", "message": "unknown parameter"} for name in unknown],
        )


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


async def read_body(request: Request) -> bytes:
    """A signed request's body, refused (413) past `MAX_BODY_BYTES` before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and _digits(declared, "Content-Length") > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    return bytes(body)


def _digits(value: str, header: str) -> int:
    """A header holding a whole number of ASCII digits, as an int; `int()` alone would take
    "²" or " 1_0 ", and raise on 4,300 digits. Longer than `_MAX_DIGITS` reads as too big.

    Raises:
        ApiError: 400 naming the header when it is not digits.
    """
    if not value.isascii() or not value.isdigit():
        raise ApiError(400, "bad_request", f"{header} must be a whole number")
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def verify_signature(
    settings: Settings, headers: Any, body: bytes, *, now: float | None = None
) -> None:
    """Check `X-Oncelery-Timestamp` and `X-Oncelery-Signature` (constant-time).

    Raises:
        ApiError: 401, naming what is wrong; 503 when WEBHOOK_SECRET is unset.
    """
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        raise not_configured("WEBHOOK_SECRET")
    timestamp = headers.get("x-oncelery-timestamp")
    signature = headers.get("x-oncelery-signature")
    if not timestamp or not signature:
        raise ApiError(
            401, "unauthorized", "X-Oncelery-Timestamp and X-Oncelery-Signature are required"
        )
    # Unix seconds have 10 digits until 2286; more (or padding) is no clock we can check.
    if len(timestamp) > _MAX_DIGITS or not timestamp.isascii() or not timestamp.isdigit():
        raise ApiError(401, "unauthorized", "X-Oncelery-Timestamp must be unix seconds")
    if abs((now if now is not None else time.time()) - int(timestamp)) > SIGNATURE_TOLERANCE:
        raise ApiError(401, "unauthorized", "X-Oncelery-Timestamp is too old or in the future")
    expected = sign(settings.webhook_secret.get_secret_value(), timestamp, body)
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
        raise ApiError(401, "unauthorized", "X-Oncelery-Signature does not match the body")
