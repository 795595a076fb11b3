"""Builds the sandbox provider's FastAPI app: services, sandbox endpoints, error recording.

Handlers are `async def` and run their SQLite work synchronously on the single event loop.
"""

from __future__ import annotations

import random

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import admin, routes
from .faults import FaultPlan, Faults
from .places import RateCap
from .state import SandboxState, get_state, service_of
from .store import SandboxStore
from .world import DEFAULT_SEED, World


def create_app(
    store: SandboxStore,
    faults: Faults | None = None,
    honour_keys: bool = True,
    hang_seconds: float = 30.0,
    *,
    seed: int | None = None,
    places_seed: int = DEFAULT_SEED,
    places_rate: int | None = None,
) -> FastAPI:
    """Build the sandbox provider app.

    Every handler is `async def` and does its SQLite work synchronously, with no await between
    looking up an idempotency key, applying the effect and keeping the answer. The one event-loop
    thread thus serialises those sections, which is what makes "a repeat applies nothing" atomic
    without locks, however many workers call concurrently.

    Args:
        store: Where requests, effects and idempotent answers are kept; the caller closes it.
        faults: The global faults at start; none by default.
        honour_keys: Whether `Idempotency-Key` deduplicates (False exercises at-most-once steps).
        hang_seconds: How long a timeout or a lost reply hangs before answering 504.
        seed: Seed of the app's random source for fault decisions, for reproducible tests.
        places_seed: Seed of the places world (generated on the first places request).
        places_rate: The most places searches admitted per second; `None`: no cap.

    Returns:
        The app, its state on `app.state.sandbox`.

    Raises:
        ValueError: If `hang_seconds` is negative or `places_rate` is not positive.
    """
    if hang_seconds < 0:
        raise ValueError(f"hang_seconds must be >= 0, got {hang_seconds}")
    app = FastAPI(title="oncelery sandbox provider")
    app.state.sandbox = SandboxState(
        store=store,
        plan=FaultPlan(global_faults=faults or Faults()),
        honour_keys=honour_keys,
        hang_seconds=hang_seconds,
        rng=random.Random(seed),
        world=World(places_seed),
        places_rate=RateCap(places_rate),
    )
    app.include_router(routes.router)
    app.include_router(admin.router)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def _record_rejected(request: Request, response: Response) -> None:
    # Requests refused before reaching a handler (bad body, unknown path) are still requests a
    # service received, and the report promises every one of them.
    service = service_of(request.url.path)
    if service is not None:
        get_state(request).record(request, service, status=response.status_code)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"expected RequestValidationError, got {type(exc).__name__}")
    response = await request_validation_exception_handler(request, exc)
    _record_rejected(request, response)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        raise TypeError(f"expected HTTPException, got {type(exc).__name__}")
    response = await http_exception_handler(request, exc)
    _record_rejected(request, response)
    return response
