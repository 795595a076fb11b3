"""The HTTP intake (`oncelery api`): the signed webhook of every pipeline, the read API (jobs, a
map step's items, dead letters), health and Prometheus metrics. Errors are JSON; the webhook
answers 4xx to bad input, never 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Final
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException

from config import Settings
from jobs.engine.enqueue import OutboxRelay
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.errors import InvalidEvent, UnknownPipeline
from jobs.events import Event, read_event
from jobs.ops import health
from jobs.ops.dead_letters import DeadLetterDesk, letter_view
from jobs.ops.health import Probe
from jobs.ops.history import history_view
from jobs.ops.map_items import (
    MAX_AFTER,
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    BadItemsQuery,
    NoSuchMap,
    items_page,
    page_view,
)
from jobs.ops.metrics import render_metrics
from jobs.pipelines import Pipeline, registry
from jobs.web import docs_page, pages, signal_route
from jobs.web.api_models import Accepted, DryRun, Health, JobList, LetterList
from jobs.web.api_schema import api_schema, errors, package_version, signed_headers
from jobs.web.http import (
    ApiError,
    Intake,
    IntakeDep,
    api_error,
    http_error,
    read_body,
    reject_unknown_query,
    require_token,
    validation_error,
    verify_signature,
)
from jobs.web.job_writer import JobWriter
from jobs.worker import CeleryDispatch
from jobs.worker.queues import broker_reachable
from ledger import (
    DeadLetterNotFound,
    DeadLetterState,
    DeadLetterStore,
    EventConflict,
    ItemState,
    JobNotFound,
    JobState,
    PostgresLimits,
    create_engine,
)
from ledger.map_views import MapViews

logger = logging.getLogger(__name__)

#: Seconds `/healthz` waits for each dependency (Docker's health check gives up after 3).
HEALTH_DEADLINE: Final = 2.5


def create_app(settings: Settings) -> FastAPI:
    """The intake's FastAPI application (the relay thread runs while it serves)."""
    for variable, value in (
        ("WEBHOOK_SECRET", settings.webhook_secret),
        ("API_TOKEN", settings.api_token),
    ):
        if value is None:
            logger.warning(
                "%s is not set: the endpoints it guards answer 503",
                variable,
                extra={"action": "secret_unset"},
            )
    load_pipelines(settings)
    rt = Runtime.from_settings(settings, engine=intake_engine(settings))
    dispatch = CeleryDispatch(settings=settings)
    intake = Intake(
        settings,
        rt,
        DeadLetterStore(engine=rt.engine),
        OutboxRelay(rt, dispatch, _first_step),
        dispatch,
        ThreadPoolExecutor(settings.intake_database_threads, thread_name_prefix="intake-db"),
    )
    intake.writer = JobWriter(rt.store, intake.in_database, writes=settings.intake_database_threads)
    intake.probes = (
        Probe("database", rt.store.ping, deadline=HEALTH_DEADLINE),
        Probe("broker", lambda: _broker_answers(dispatch), deadline=HEALTH_DEADLINE),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        intake.relay.start()
        try:
            yield
        finally:
            intake.relay.stop()
            intake.database_threads.shutdown(wait=False, cancel_futures=True)
            rt.close()

    app = FastAPI(
        title="oncelery",
        version=package_version(),
        description="The HTTP intake: signed webhooks and signals, the read API (bearer "
        "token), health and metrics. The pages for people (HTML) are not part of the API.",
        lifespan=lifespan,
        # Our own /docs (`docs_page`): FastAPI's loads unpinned scripts from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.intake = intake
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    # Starlette's class, not FastAPI's subclass: the router's own 404 and 405 are Starlette's.
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.include_router(_routes())
    app.include_router(signal_route.router)
    app.include_router(pages.router, include_in_schema=False)
    app.include_router(docs_page.router)
    app.openapi = lambda: api_schema(app)  # type: ignore[method-assign]
    return app


def _routes() -> APIRouter:
    router = APIRouter()
    # The token first: who has none learns nothing of the parameters either.
    authorized = [Depends(require_token), Depends(reject_unknown_query)]
    token_errors = (401, 422, 503)

    @router.post(
        "/webhooks/{pipeline}",
        summary="Start a job",
        status_code=202,
        response_model=Accepted,
        responses={
            200: {"model": Accepted, "description": "The event was accepted before: its job."},
            202: {
                "model": Accepted,
                "description": "A new job, stored (and sent or in the outbox).",
            },
            **errors(400, 401, 404, 409, 413, 422, 503),
        },
        openapi_extra={"parameters": signed_headers()},
    )
    async def webhook(pipeline: str, request: Request, intake: IntakeDep) -> JSONResponse:
        body = await read_body(request)
        # Signed first: who cannot sign learns nothing, not even which pipelines exist.
        verify_signature(intake.settings, request.headers, body)
        reject_unknown_query(request)
        found = declared_pipeline(pipeline)
        job = parse_event(found, body).new_job(found)
        try:
            job_id, created = await intake.writer.create(job)
        except EventConflict as conflict:
            raise ApiError(
                409,
                "conflict",
                f"event_id {conflict.event_id!r} was accepted before with other content",
                field="event_id",
                event_id=conflict.event_id,
            ) from None
        # A 202 means the job is in Postgres: its row is the outbox, and the relay thread hands
        # it to the broker, so a broker outage delays jobs but never loses them.
        if created:
            intake.relay.accepted(found.name, job_id)
        return JSONResponse({"job_id": str(job_id)}, status_code=202 if created else 200)

    @router.get(
        "/healthz",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "The database or the broker is down."},
            **errors(422),
        },
        dependencies=[Depends(reject_unknown_query)],
    )
    async def healthz(intake: IntakeDep) -> JSONResponse:
        # Which dependency is down, never its error text (logged): no token guards this.
        states = await asyncio.gather(*(probe.status() for probe in intake.probes))
        checks = {probe.name: state for probe, state in zip(intake.probes, states, strict=True)}
        healthy = all(state == health.OK for state in states)
        return JSONResponse(checks, status_code=200 if healthy else 503)

    @router.get(
        "/jobs/{job_id}",
        dependencies=authorized,
        response_model=dict[str, Any],
        responses=errors(404, *token_errors),
    )
    def get_job(job_id: UUID, intake: IntakeDep) -> JSONResponse:
        try:
            return JSONResponse(history_view(intake.runtime.store.history(job_id)))
        except JobNotFound:
            raise ApiError(404, "not_found", f"no job {job_id}") from None

    @router.get(
        "/jobs/{job_id}/steps/{step}/items",
        dependencies=authorized,
        response_model=dict[str, Any],
        responses=errors(404, *token_errors),
    )
    def get_items(
        job_id: str,
        step: str,
        intake: IntakeDep,
        # Checked by `items_page`, as for the page: empty for every state.
        state: Annotated[
            str, Query(json_schema_extra={"enum": ["", *(str(s) for s in ItemState)]})
        ] = "",
        # A next link's cursor: an item's path, digits and dots.
        after: Annotated[str, Query(max_length=MAX_AFTER, pattern=r"^[ -~]*$")] = "",
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    ) -> JSONResponse:
        views = MapViews(engine=intake.runtime.engine)
        try:
            page = items_page(
                intake.runtime.store,
                views,
                job_id,
                step,
                state=state,
                after=after,
                limit=limit,
            )
        except NoSuchMap as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except BadItemsQuery as exc:
            raise ApiError(422, "bad_request", str(exc)) from None
        return JSONResponse(page_view(str(UUID(job_id)), step, page))

    @router.get(
        "/jobs",
        dependencies=authorized,
        response_model=JobList,
        responses=errors(404, *token_errors),
    )
    def list_jobs(
        intake: IntakeDep,
        state: JobState | None = None,
        pipeline: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> JSONResponse:
        if pipeline is not None:
            declared_pipeline(pipeline)
        jobs = intake.runtime.store.list_jobs(state=state, limit=limit, pipeline=pipeline)
        return JSONResponse({"jobs": [job_summary(job) for job in jobs]})

    @router.get(
        "/dead-letters",
        dependencies=authorized,
        response_model=LetterList,
        responses=errors(*token_errors),
    )
    def dead_letters(
        intake: IntakeDep,
        state: DeadLetterState | None = DeadLetterState.OPEN,
        step: str | None = None,
        error_type: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONResponse:
        found = intake.letters.list(state=state, step=step, error_type=error_type, limit=limit)
        return JSONResponse({"dead_letters": [letter_view(letter) for letter in found]})

    @router.post(
        "/dead-letters/{letter_id}/replay",
        dependencies=authorized,
        response_model=dict[str, Any],
        responses={
            200: {"description": "Replayed, or (`dry_run`) the plan.", "model": DryRun},
            **errors(404, 409, *token_errors),
        },
    )
    def replay(
        letter_id: int,
        intake: IntakeDep,
        force: bool = False,
        dry_run: bool = False,
        by: str = "api",
    ) -> JSONResponse:
        try:
            letter = intake.letters.get(letter_id)
        except DeadLetterNotFound:
            raise ApiError(404, "not_found", f"no dead letter {letter_id}") from None
        desk = DeadLetterDesk(
            store=intake.runtime.store, letters=intake.letters, dispatch=intake.dispatch
        )
        if dry_run:
            return JSONResponse({"dry_run": True, "plan": desk.plan(letter, force=force).as_json()})
        result = desk.replay(letter, by=by, force=force)
        if not result.done:
            raise ApiError(409, "replay_refused", result.detail, **result.as_json())
        return JSONResponse(result.as_json())

    @router.get(
        "/metrics",
        dependencies=authorized,
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus's text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **errors(401, 503),
        },
    )
    def metrics(intake: IntakeDep) -> Response:
        text, content_type = render_metrics(intake.runtime, intake.dispatch.sender)
        return Response(text, media_type=content_type)

    return router


def _first_step(pipeline: str) -> str:
    return registry.get(pipeline).steps[0].name


def declared_pipeline(name: str) -> Pipeline[object]:
    """The pipeline a webhook's path (or a query) names.

    Raises:
        ApiError: 404 naming it, when no pipeline has that name.
    """
    try:
        return registry.get(name)
    except UnknownPipeline as exc:
        raise ApiError(404, "unknown_pipeline", str(exc), pipeline=name) from None


def parse_event(pipeline: Pipeline[object], body: bytes) -> Event:
    """The webhook's event, validated like the CLI's.

    Raises:
        ApiError: 422, naming the invalid fields.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(422, "invalid_body", "the body is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object")
    try:
        return read_event(pipeline, value)
    except InvalidEvent as exc:
        fields = list(exc.fields) or [{"field": "", "message": exc.problem}]
        raise ApiError(422, "invalid_body", exc.problem, fields=fields) from None


def intake_engine(settings: Settings) -> Engine:
    """The intake's engine: its Postgres connections give up on a server that does not answer
    (connect and statement timeouts, TCP keepalives), sized for its database threads."""
    limits = PostgresLimits(
        connect_timeout=settings.intake_connect_timeout,
        statement_timeout=settings.intake_statement_timeout,
        keepalive_idle=settings.intake_keepalive,
    )
    return create_engine(
        settings.database_url, pool_size=settings.intake_database_threads, limits=limits
    )


def _broker_answers(dispatch: CeleryDispatch) -> None:
    state = broker_reachable(dispatch.sender)
    if state != "ok":
        raise ConnectionError(state)


def job_summary(job: Any) -> dict[str, object]:
    """One line of `GET /jobs`."""
    return {
        "job_id": str(job.id),
        "pipeline": job.pipeline,
        "event_id": job.event_id,
        "order_id": job.context.get("order_id"),
        "state": str(job.state),
        "current_step": job.current_step,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
