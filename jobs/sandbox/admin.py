"""The sandbox's own endpoints: fault control, reports of requests and effects, reset, health.

These are never subject to injected faults and are not recorded as requests.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from .faults import FaultUpdate
from .places import TruthQuery
from .services import Service
from .state import SandboxState, get_state
from .store import EffectKind

logger = logging.getLogger(__name__)

router = APIRouter()

StateDep = Annotated[SandboxState, Depends(get_state)]


def _faults_json(state: SandboxState) -> dict[str, object]:
    return {**state.plan.to_json(), "honour_keys": state.honour_keys}


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """Answer that the sandbox is up."""
    return JSONResponse({"ok": True})


@router.get("/sandbox/faults")
async def get_faults(state: StateDep) -> JSONResponse:
    """Return the global faults, the per-service overrides and whether keys are honoured."""
    return JSONResponse(_faults_json(state))


@router.post("/sandbox/faults")
async def set_faults(update: FaultUpdate, state: StateDep) -> JSONResponse:
    """Replace the global faults, or one service's override, and/or toggle key handling.

    Fault fields left out are 0 (the body replaces a set, it does not patch it), except that a
    body naming only `honour_keys` changes no faults. Overrides survive a new global set.
    """
    state.plan.apply(update)
    if update.honour_keys is not None:
        state.honour_keys = update.honour_keys
    logger.info(
        "sandbox faults set: %s",
        update.model_dump(mode="json", exclude_none=True),
        extra={"action": "sandbox.faults_set"},
    )
    return JSONResponse(_faults_json(state))


@router.get("/sandbox/effects")
async def list_effects(
    state: StateDep,
    kind: EffectKind | None = None,
    order_id: str | None = None,
    crawl_id: str | None = None,
) -> JSONResponse:
    """List every effect applied, oldest first, optionally of one kind, order or crawl."""
    rows = state.store.list_effects(kind=kind, order_id=order_id, crawl_id=crawl_id)
    return JSONResponse([dataclasses.asdict(row) for row in rows])


@router.get("/sandbox/requests")
async def list_requests(
    state: StateDep,
    service: Service | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> JSONResponse:
    """List the requests the services received, oldest first; `limit` keeps the latest ones."""
    rows = state.store.list_requests(service=service, limit=limit)
    return JSONResponse([dataclasses.asdict(row) for row in rows])


@router.get("/sandbox/places/truth")
async def places_truth(query: Annotated[TruthQuery, Query()], state: StateDep) -> JSONResponse:
    """List every place of the world in a circle (of one category, or all), nearest first."""
    found = state.world.within(query.lat, query.lng, query.radius_m, query.category)
    return JSONResponse({"places": [place.to_json() for place in found]})


@router.post("/sandbox/reset")
async def reset(state: StateDep) -> JSONResponse:
    """Forget every request, effect and idempotent answer; the faults stay as they are."""
    state.store.reset()
    return JSONResponse({"ok": True})
