"""The API's OpenAPI schema (`/openapi.json`, shown at `/docs`): one error shape, the statuses
each route answers, the bearer token, and the webhook of each declared pipeline with its
event's schema and its signature headers."""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any, Final

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from jobs.pipelines import Pipeline, registry
from jobs.signals import SIGNAL_NAME_PATTERN, SignalBody

#: What each status means, wherever it is answered.
STATUSES: Final = {
    400: "A header is malformed (Content-Length not a number).",
    401: "Missing or wrong credentials: the bearer token, or the webhook's signature.",
    404: "No such job, step, map, dead letter or pipeline (named in the message).",
    409: "A conflict: the same id accepted before with other content, or a replay refused.",
    413: "The body is over 64 KiB.",
    422: "The request is invalid: the fields named in `error.fields`.",
    500: "A job waits in a pipeline this server does not declare (ONCELERY_PIPELINES).",
    503: "The server is not configured for this endpoint (its secret is unset), or the "
    "database is not answering: send the request again.",
}

#: The webhook's route, documented once per declared pipeline.
WEBHOOK_PATH: Final = "/webhooks/{pipeline}"
SIGNAL_PATH: Final = "/signals/{name}"
TIMESTAMP_HEADER: Final = "X-Oncelery-Timestamp"
SIGNATURE_HEADER: Final = "X-Oncelery-Signature"
#: Postgres text and JSONB cannot hold NUL: no string the API takes may contain one.
NO_NUL: Final = "^[^\\x00]*$"
#: How the headers look (what the server checks first: else 401).
TIMESTAMP_PATTERN: Final = r"^[0-9]{1,12}$"
SIGNATURE_PATTERN: Final = r"^sha256=[0-9a-f]{64}$"


class ErrorDetail(BaseModel):
    """What went wrong; some errors add fields (`field`, `fields`, `pipeline`, `event_id`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error the API answers (the pages answer HTML)."""

    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route for these error statuses, each with the one error shape."""
    return {status: {"model": ErrorBody, "description": STATUSES[status]} for status in statuses}


def signed_headers() -> list[dict[str, Any]]:
    """The webhook's and the signals' signature headers, as OpenAPI parameters."""
    return [
        {
            "name": TIMESTAMP_HEADER,
            "in": "header",
            "required": True,
            "description": "Unix seconds when the request was signed; within 5 minutes of the "
            "server's clock.",
            "schema": {"type": "string", "pattern": TIMESTAMP_PATTERN},
        },
        {
            "name": SIGNATURE_HEADER,
            "in": "header",
            "required": True,
            "description": 'sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>" keyed with '
            "WEBHOOK_SECRET>.",
            "schema": {"type": "string", "pattern": SIGNATURE_PATTERN},
        },
    ]


def api_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema, built once: FastAPI's, with the webhook written out for each
    declared pipeline (its own event schema) in place of `/webhooks/{pipeline}`."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    signal = schema["paths"].get(SIGNAL_PATH, {}).get("post")
    if signal is not None:
        signal["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": model_schema(SignalBody, components)}},
        }
        # Checked after the signature, so not by FastAPI: described here.
        for parameter in signal["parameters"]:
            if parameter["name"] == "name":
                parameter["schema"].update(minLength=1, maxLength=100, pattern=SIGNAL_NAME_PATTERN)
    template = schema["paths"].pop(WEBHOOK_PATH, None)
    if template is not None:
        for pipeline in sorted(registry, key=lambda found: found.name):
            path = WEBHOOK_PATH.replace("{pipeline}", pipeline.name)
            schema["paths"][path] = _webhook(template, pipeline, components)
    for found in components.values():
        _no_nul(found)
    for operations in schema["paths"].values():
        for operation in operations.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                _no_nul(body["schema"])
    app.openapi_schema = schema
    return schema


def _no_nul(found: Any) -> None:
    """Say of every string in a schema without a pattern of its own that it holds no NUL."""
    if isinstance(found, list):
        for each in found:
            _no_nul(each)
    elif isinstance(found, dict):
        if found.get("type") == "string" and "pattern" not in found and "format" not in found:
            found["pattern"] = NO_NUL
        for key, each in found.items():
            if key not in ("default", "examples", "enum", "const"):
                _no_nul(each)


def _webhook(
    template: dict[str, Any], pipeline: Pipeline[object], components: dict[str, Any]
) -> dict[str, Any]:
    operation = copy.deepcopy(template["post"])
    operation["operationId"] = f"webhook_{pipeline.name.replace('-', '_')}"
    operation["summary"] = f"Start a {pipeline.name} job"
    # The path names a declared pipeline: no 404 here.
    operation["responses"].pop("404", None)
    operation["parameters"] = [
        parameter for parameter in operation.get("parameters", []) if parameter["in"] != "path"
    ]
    operation["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": event_schema(pipeline, components)}},
    }
    return {"post": operation}


def event_schema(pipeline: Pipeline[object], components: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's event: `event_id` beside its input model's fields (any fields for a
    pipeline declared without one); the models it refers to are added to `components`."""
    event_id = {"type": "string", "minLength": 1, "maxLength": 200}
    if pipeline.input is None:
        # Any object, with the fields its steps' key templates name.
        named = sorted(set().union(*(step.key_fields() for step in pipeline.steps)))
        return {
            "type": "object",
            "properties": {"event_id": event_id, **{name: {} for name in named}},
            "required": ["event_id", *named],
            "additionalProperties": True,
        }
    found = model_schema(pipeline.input, components)
    found["properties"] = {"event_id": event_id, **found.get("properties", {})}
    found["required"] = ["event_id", *found.get("required", [])]
    found["title"] = f"{pipeline.name} event"
    return found


def model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model's JSON schema for a request body, the models it refers to moved to
    `components` (a `#/$defs/…` reference would point into the whole OpenAPI document)."""
    found = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(found.pop("$defs", {}))
    return found


def package_version() -> str:
    """oncelery's version, from its package metadata (the schema's `info.version`)."""
    try:
        return metadata.version("oncelery")
    except metadata.PackageNotFoundError:
        return "unknown"
