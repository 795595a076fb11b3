"""The sandbox app's mutable state (store, fault plan, key handling, dice, places world and
rate cap) and its lookup."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastapi import Request

from .faults import FaultPlan, Outcome
from .places import RateCap
from .services import SERVICES, Service
from .store import SandboxStore, utc_now
from .world import World


@dataclass
class SandboxState:
    """Everything one sandbox app holds between requests (kept on `app.state.sandbox`)."""

    store: SandboxStore
    plan: FaultPlan
    honour_keys: bool
    hang_seconds: float
    rng: random.Random
    world: World
    places_rate: RateCap

    def record(
        self,
        request: Request,
        service: Service,
        *,
        status: int,
        outcome: Outcome = Outcome.OK,
    ) -> None:
        """Record a request to a service with the status answered and the fault injected."""
        self.store.record_request(
            started_at=getattr(request.state, "started_at", None),
            method=request.method,
            path=request.url.path,
            service=str(service),
            idempotency_key=request.headers.get("idempotency-key"),
            status=status,
            fault=None if outcome is Outcome.OK else str(outcome),
        )


def arrived(request: Request) -> None:
    """Note when a request reached its service (kept with its record: with the time it was
    answered, it says what was in flight at once)."""
    if getattr(request.state, "started_at", None) is None:
        request.state.started_at = utc_now()


def get_state(request: Request) -> SandboxState:
    """Return the state of the app serving `request` (a FastAPI dependency)."""
    state = request.app.state.sandbox
    if not isinstance(state, SandboxState):
        raise TypeError("app.state.sandbox is not a SandboxState; build the app with create_app()")
    return state


def service_of(path: str) -> Service | None:
    """Return the service a URL path addresses, or `None` for /sandbox/*, /healthz and others."""
    first = path.lstrip("/").split("/", 1)[0]
    return Service(first) if first in SERVICES else None
