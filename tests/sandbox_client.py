"""An in-process sandbox for tests: the app behind httpx's ASGI transport, called synchronously.

No socket is opened. Not imported by the package; tests import `tests.sandbox_client` themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

import httpx

from jobs.sandbox.app import create_app
from jobs.sandbox.faults import Faults
from jobs.sandbox.store import SandboxStore

#: A request to send concurrently: given the async client, return its response.
Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


class SandboxClient:
    """A synchronous face on an async httpx client wired to a sandbox app in process.

    One `asyncio.Runner` per client keeps a single event loop across calls, as uvicorn has.
    """

    def __init__(self, client: httpx.AsyncClient, runner: asyncio.Runner) -> None:
        self._client = client
        self._runner = runner

    def get(self, url: str, *, params: Mapping[str, str | int] | None = None) -> httpx.Response:
        """Send a GET and return its answer."""
        return self._runner.run(self._client.get(url, params=params))

    def post(
        self,
        url: str,
        *,
        json: object = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send a POST with a JSON body (or raw `content`) and return its answer."""
        return self._runner.run(self._client.post(url, json=json, content=content, headers=headers))

    def concurrently(self, calls: list[Call]) -> list[httpx.Response]:
        """Send several requests at once on the loop and return their answers in order."""

        async def run_all() -> list[httpx.Response]:
            return list(await asyncio.gather(*(call(self._client) for call in calls)))

        return self._runner.run(run_all())

    def effects(self, **filters: str) -> list[dict[str, object]]:
        """Return `GET /sandbox/effects` with the given filters (`kind`, `order_id`)."""
        return self._report("/sandbox/effects", filters)

    def requests(self, **filters: str | int) -> list[dict[str, object]]:
        """Return `GET /sandbox/requests` with the given filters (`service`, `limit`)."""
        return self._report("/sandbox/requests", filters)

    def _report(self, url: str, params: Mapping[str, str | int]) -> list[dict[str, object]]:
        answer = self.get(url, params=params)
        answer.raise_for_status()
        rows: list[dict[str, object]] = answer.json()
        return rows


@contextmanager
def open_sandbox(
    store: SandboxStore,
    faults: Faults | None = None,
    *,
    honour_keys: bool = True,
    hang_seconds: float = 30.0,
    seed: int | None = None,
    places_rate: int | None = None,
) -> Iterator[SandboxClient]:
    """Build a sandbox app over `store` and yield a client for it; close the client after.

    Args:
        store: The store the app uses; the caller closes it.
        faults: The global faults at start.
        honour_keys: Whether `Idempotency-Key` deduplicates.
        hang_seconds: How long timeouts and lost replies hang (keep it tiny in tests).
        seed: Seed for the app's fault dice.
        places_rate: The most places searches admitted per second; `None`: no cap.

    Yields:
        A synchronous client whose requests reach the app without a socket.
    """
    app = create_app(store, faults, honour_keys, hang_seconds, seed=seed, places_rate=places_rate)
    with asyncio.Runner() as runner:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://sandbox"
        )
        try:
            yield SandboxClient(client, runner)
        finally:
            runner.run(client.aclose())
