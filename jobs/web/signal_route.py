"""`POST /signals/{name}`: a signal, signed like the webhook, body `{"key", "signal_id",
"data"?}`: 202 recorded, 200 duplicate, 409 the id sent before with another key or data, 401
a bad signature, 422 a bad name or body (naming the fields)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from jobs.engine.signals import send_signal
from jobs.errors import UnknownPipeline
from jobs.signals import InvalidSignal, read_signal
from jobs.web.api_models import SignalAnswer
from jobs.web.api_schema import errors, signed_headers
from jobs.web.http import (
    ApiError,
    IntakeDep,
    read_body,
    reject_unknown_query,
    verify_signature,
)
from ledger import NewSignal, SignalConflict, SignalOutcome, SignalSent

router = APIRouter()


@router.post(
    "/signals/{name}",
    summary="Send a signal",
    status_code=202,
    response_model=SignalAnswer,
    responses={
        200: {"model": SignalAnswer, "description": "A duplicate: the id was sent before."},
        202: {"model": SignalAnswer, "description": "Recorded (and the job it woke, if any)."},
        **errors(400, 401, 409, 413, 422, 500, 503),
    },
    # The body is read raw (its signature covers its bytes): `api_schema` describes it.
    openapi_extra={"parameters": signed_headers()},
)
async def post_signal(name: str, request: Request, intake: IntakeDep) -> JSONResponse:
    body = await read_body(request)
    # Signed first: who cannot sign learns nothing.
    verify_signature(intake.settings, request.headers, body)
    reject_unknown_query(request)
    signal = _parse(name, body)
    rt, dispatch = intake.runtime, intake.dispatch
    try:
        # On a database thread: its publish, if it moved a job on, waits for the broker too.
        sent: SignalSent = await intake.in_database(lambda: send_signal(rt, dispatch, signal))
    except SignalConflict as conflict:
        raise ApiError(
            409,
            "conflict",
            f"signal_id {conflict.signal_id!r} was sent before with another key or other data",
            field="signal_id",
            signal_id=conflict.signal_id,
        ) from None
    except UnknownPipeline as exc:
        # A job waits for it in a pipeline this server does not declare: a deployment
        # problem (ONCELERY_PIPELINES), not the sender's; nothing was written.
        raise ApiError(500, "unknown_pipeline", str(exc), pipeline=exc.name) from None
    woke = sent.woke
    answer = {
        "outcome": str(sent.outcome),
        "signal_id": signal.signal_id,
        "woke": {"job_id": str(woke.job_id), "step": woke.step} if woke is not None else None,
    }
    recorded = sent.outcome is SignalOutcome.RECORDED
    return JSONResponse(answer, status_code=202 if recorded else 200)


def _parse(name: str, body: bytes) -> NewSignal:
    """The signal a request names and carries.

    Raises:
        ApiError: 422, naming the invalid fields.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(422, "invalid_body", "the body is not UTF-8 JSON") from None
    try:
        return read_signal(name, value)
    except InvalidSignal as exc:
        fields = list(exc.fields) or [{"field": "", "message": exc.problem}]
        raise ApiError(422, "invalid_body", exc.problem, fields=fields) from None
