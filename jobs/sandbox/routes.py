"""The services' HTTP endpoints, and the path each request takes: latency, fault, key, effect.

Handlers are `async def` and touch SQLite synchronously, on purpose (see `_serve`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from . import places, services
from .faults import Outcome, decide
from .places import DatasetRequest, PlacesSearch
from .services import ChargeRequest, NotificationRequest, QuoteRequest, Reply, Service
from .state import SandboxState, arrived, get_state

logger = logging.getLogger(__name__)

#: The body of a 503 for an injected fault.
INJECTED_FAULT: dict[str, object] = {"error": {"type": "injected_fault"}}
#: The body of a 429 for an injected rate limit (`rate_limited_rate`).
INJECTED_RATE_LIMIT: dict[str, object] = {"error": {"type": "rate_limited", "injected": True}}
#: The body of a 504 after a timeout or a lost reply; the same for both, as a client cannot tell.
GATEWAY_TIMEOUT: dict[str, object] = {"error": {"type": "gateway_timeout"}}
#: The body of a 429 for a places search above `--places-rate`.
RATE_LIMITED: dict[str, object] = {
    "error": {"type": "rate_limited", "message": "Too many places searches; see Retry-After."}
}

router = APIRouter()

StateDep = Annotated[SandboxState, Depends(get_state)]
KeyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]


def fingerprint_of(body: BaseModel) -> str:
    """Return the sha256 of the validated body as canonical JSON (sorted keys, no spaces).

    Hashing the validated model rather than the raw bytes makes key order, whitespace and an
    explicit default irrelevant: only a different request is a different fingerprint.
    """
    canonical = json.dumps(
        body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _serve(
    state: SandboxState, service: Service, request: Request, work: Callable[[], Reply]
) -> JSONResponse:
    """Answer one request to a service: wait the latency, inject the fault, else do `work`."""
    arrived(request)
    outcome = await _roll(state, service, request)
    if outcome is Outcome.RATE_LIMITED:
        state.record(request, service, status=429, outcome=outcome)
        wait = state.plan.for_service(service).retry_after_seconds
        return JSONResponse(
            INJECTED_RATE_LIMIT, status_code=429, headers={"Retry-After": str(wait)}
        )
    if outcome is Outcome.ERROR:
        state.record(request, service, status=503, outcome=outcome)
        return JSONResponse(INJECTED_FAULT, status_code=503)
    if outcome is Outcome.TIMEOUT:
        # Recorded before the hang so the report is complete at once, even if the sandbox is
        # stopped while the request hangs; nothing is applied either way.
        state.record(request, service, status=504, outcome=outcome)
        await _hang(state.hang_seconds)
        return JSONResponse(GATEWAY_TIMEOUT, status_code=504)
    # From here to the commit there is no await: the event loop runs no other handler meanwhile,
    # so "look up the key → apply the effect → keep the answer" is atomic with respect to every
    # other request, and a repeat can only ever see the whole of it or none of it.
    with state.store.transaction():
        reply = work()
        answered = 504 if outcome is Outcome.LOST_REPLY else reply.status
        state.record(request, service, status=answered, outcome=outcome)
    if outcome is Outcome.LOST_REPLY:
        # The effect is committed and its answer kept; the client gives up before hearing it.
        await _hang(state.hang_seconds)
        return JSONResponse(GATEWAY_TIMEOUT, status_code=504)
    return JSONResponse(reply.body, status_code=reply.status)


async def _roll(state: SandboxState, service: Service, request: Request) -> Outcome:
    """Wait the service's latency, then draw this request's fault from the faults then in force."""
    latency_ms = state.plan.for_service(service).latency_ms
    if latency_ms:
        await asyncio.sleep(latency_ms / 1000)
    outcome = decide(state.plan.for_service(service), state.rng.random())
    if outcome is not Outcome.OK:
        logger.debug(
            "sandbox injects %s on %s %s",
            outcome,
            request.method,
            request.url.path,
            extra={"action": "sandbox.fault", "service": str(service)},
        )
    return outcome


async def _hang(seconds: float) -> None:
    """Hang like a stuck upstream until `seconds` pass or the server cancels the request."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        # uvicorn cancels requests still running when its graceful shutdown times out. A hanging
        # request was recorded, and its effect (if any) committed, before the hang: ending it
        # here loses nothing and spares the log a traceback per hanging request.
        logger.debug("sandbox hang cut short by shutdown", extra={"action": "sandbox.hang_cut"})


def _apply(state: SandboxState, service: Service, key: str | None, reply: Reply) -> Reply:
    if reply.effect is not None:
        state.store.apply_effect(reply.effect, service=str(service), idempotency_key=key)
    return reply


def _once(
    state: SandboxState,
    service: Service,
    key: str | None,
    body: BaseModel,
    produce: Callable[[], Reply],
) -> Reply:
    """Produce and apply a reply, or return the one kept under `key` (synchronous on purpose).

    Only final answers reach here (faults and validation errors never do), so every reply
    produced under an honoured key is kept, the permanent 402 included.
    """
    if key is None or not state.honour_keys:
        return _apply(state, service, key, produce())
    fingerprint = fingerprint_of(body)
    stored = state.store.find_response(str(service), key)
    if stored is None:
        reply = _apply(state, service, key, produce())
        if reply.status < 500:
            # A 5xx is not a final answer: the next try with the key gets a fresh one.
            state.store.store_response(
                str(service), key, fingerprint=fingerprint, status=reply.status, body=reply.body
            )
        return reply
    if stored.fingerprint != fingerprint:
        logger.info(
            "idempotency key %s reused with a different body on %s",
            key,
            service,
            extra={"action": "sandbox.key_reused", "service": str(service), "key": key},
        )
        return Reply(status=422, body=_key_reused(key))
    return Reply(status=stored.status, body=stored.body)


def _key_reused(key: str) -> dict[str, object]:
    message = f"Idempotency-Key {key!r} was already used with a different request body."
    return {"error": {"type": "idempotency_key_reused", "message": message}}


@router.get("/customers/{customer_id}")
async def get_customer(customer_id: str, request: Request, state: StateDep) -> JSONResponse:
    """Return a customer; every id exists. Reads apply nothing, so a key is recorded, not used."""
    return await _serve(state, Service.CUSTOMERS, request, lambda: services.customer(customer_id))


@router.post("/prices/quote")
async def post_quote(
    body: QuoteRequest, request: Request, state: StateDep, idempotency_key: KeyHeader = None
) -> JSONResponse:
    """Quote prices for some items in integer minor units."""
    service = Service.PRICES
    return await _serve(
        state,
        service,
        request,
        lambda: _once(state, service, idempotency_key, body, lambda: services.quote(body)),
    )


@router.post("/payments/charges", status_code=201)
async def post_charge(
    body: ChargeRequest, request: Request, state: StateDep, idempotency_key: KeyHeader = None
) -> JSONResponse:
    """Charge a customer: 201 and a charge effect, or 402 for a declined card."""
    service = Service.PAYMENTS
    return await _serve(
        state,
        service,
        request,
        lambda: _once(state, service, idempotency_key, body, lambda: services.charge(body)),
    )


@router.post("/notifications", status_code=201)
async def post_notification(
    body: NotificationRequest, request: Request, state: StateDep, idempotency_key: KeyHeader = None
) -> JSONResponse:
    """Notify a customer: 201 and a notification effect."""
    service = Service.NOTIFICATIONS
    return await _serve(
        state,
        service,
        request,
        lambda: _once(state, service, idempotency_key, body, lambda: services.notify(body)),
    )


@router.post("/places/search")
async def post_places_search(
    body: PlacesSearch, request: Request, state: StateDep, idempotency_key: KeyHeader = None
) -> JSONResponse:
    """Search a circle for places of a category: the 20 nearest at most, nearest first.

    Billed (a `places_query` effect) unless it repeats a key. Above the rate cap it is refused
    with 429 and `Retry-After` before anything else happens: no fault, no key, no bill.
    """
    service = Service.PLACES
    arrived(request)
    wait = state.places_rate.admit()
    if wait is not None:
        state.record(request, service, status=429)
        return JSONResponse(RATE_LIMITED, status_code=429, headers={"Retry-After": str(wait)})
    return await _serve(
        state,
        service,
        request,
        lambda: _once(
            state, service, idempotency_key, body, lambda: places.search(state.world, body)
        ),
    )


@router.post("/datasets", status_code=201)
async def post_dataset(
    body: DatasetRequest, request: Request, state: StateDep, idempotency_key: KeyHeader = None
) -> JSONResponse:
    """Publish a crawl's places: 201 and a dataset effect."""
    service = Service.DATASETS
    return await _serve(
        state,
        service,
        request,
        lambda: _once(state, service, idempotency_key, body, lambda: places.publish(body)),
    )
