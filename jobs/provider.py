"""`ProviderClient`: the steps' HTTP client for downstream services, with explicit timeouts and
answers turned into `TransientError` / `PermanentError`."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Final

import httpx

from jobs.errors import PermanentError, TransientError
from jobs.outside import request_sent
from ledger import JSON

#: Statuses worth another try: the provider is overloaded, down or busy with the same key.
_TRANSIENT_STATUSES: Final = frozenset({408, 409, 425, 429})
#: Methods that read only: whatever becomes of them, they applied nothing.
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class ProviderClient:
    """An HTTP client for the provider, created lazily so each worker process opens its own.

    Args:
        base_url: where the provider listens.
        timeout: seconds to wait for connecting and for each answer.
    """

    def __init__(self, *, base_url: str, timeout: float) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        """The underlying httpx client (opened on first use)."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout)
        return self._client

    def get(self, path: str) -> dict[str, JSON]:
        """GET a JSON object; reads are safe to repeat, so any transport failure is transient."""
        return self._send("GET", path, None, None)

    def post(
        self, path: str, body: Mapping[str, JSON], *, idempotency_key: str | None = None
    ) -> dict[str, JSON]:
        """POST a JSON object, passing the step's key as `Idempotency-Key` when given."""
        return self._send("POST", path, body, idempotency_key)

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _send(
        self, method: str, path: str, body: Mapping[str, JSON] | None, key: str | None
    ) -> dict[str, JSON]:
        headers = {"Idempotency-Key": key} if key else {}
        safe = method in _SAFE_METHODS
        if not safe:
            request_sent()
        try:
            response = self.client.request(method, path, json=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing reached the provider.
            raise TransientError(
                f"{method} {path}: cannot connect: {exc}", maybe_applied=False
            ) from exc
        except httpx.TimeoutException as exc:
            # The request went out: the provider may have acted before we stopped waiting.
            raise TransientError(
                f"{method} {path}: no answer within {self.timeout}s", maybe_applied=not safe
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{method} {path}: {exc}", maybe_applied=not safe) from exc
        return _answer(method, path, response, applies=not safe)


def _answer(
    method: str, path: str, response: httpx.Response, *, applies: bool = True
) -> dict[str, JSON]:
    """A provider's answer as the step's result, or the error it means. `applies`: the request
    may apply an effect — then any answer but a definite refusal may have applied it (a
    provider that ignores keys can commit, then answer 500, 503, 409 or 429)."""
    status = response.status_code
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise TransientError(
            f"{method} {path} answered {status}{_error_type(response)}",
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            maybe_applied=applies,
            status=status,
        )
    if status >= 400:
        raise PermanentError(
            f"{method} {path} answered {status}{_error_type(response)}",
            maybe_applied=False,
            status=status,
        )
    try:
        payload = response.json()
    except ValueError as exc:
        # A success status means the provider acted, whatever became of its body.
        raise TransientError(
            f"{method} {path} answered {status} with a body that is not JSON",
            maybe_applied=applies,
            status=status,
        ) from exc
    if not isinstance(payload, dict):
        raise PermanentError(
            f"{method} {path} answered {status} with a body that is not an object",
            maybe_applied=applies,
            status=status,
        )
    return payload


def _error_type(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return f" ({error['type']})" if isinstance(error, dict) and "type" in error else ""
    except (ValueError, AttributeError):
        return ""


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """The delay a `Retry-After` header asks for (seconds, or an HTTP date); None if absent or
    unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (now if now is not None else time.time()))
