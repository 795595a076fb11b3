"""Fixtures for the sandbox provider's unit tests: a store in tmp_path and an in-process client.

No network: requests reach the app through httpx's ASGI transport (`tests.sandbox_client`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from jobs.sandbox import Faults, SandboxStore
from tests.sandbox_client import SandboxClient, open_sandbox

#: Short enough to keep the suite fast, long enough to be a real hang on the event loop.
TEST_HANG_SECONDS = 0.05


@pytest.fixture
def make_sandbox(store: SandboxStore) -> Iterator[Callable[..., SandboxClient]]:
    """Return a factory of clients on fresh apps over `store` (same arguments as `create_app`).

    Defaults differ from production: a tiny hang and a fixed seed. Clients close at teardown.
    """
    with ExitStack() as stack:

        def make(
            faults: Faults | None = None,
            *,
            honour_keys: bool = True,
            hang_seconds: float = TEST_HANG_SECONDS,
            seed: int | None = 0,
            places_rate: int | None = None,
        ) -> SandboxClient:
            return stack.enter_context(
                open_sandbox(
                    store,
                    faults,
                    honour_keys=honour_keys,
                    hang_seconds=hang_seconds,
                    seed=seed,
                    places_rate=places_rate,
                )
            )

        yield make


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SandboxStore]:
    """A fresh sandbox store in the test's temporary directory."""
    sandbox_store = SandboxStore(tmp_path / "sandbox.sqlite3")
    yield sandbox_store
    sandbox_store.close()


@pytest.fixture
def sandbox(store: SandboxStore) -> Iterator[SandboxClient]:
    """A client on a sandbox with no faults that honours keys."""
    with open_sandbox(store, hang_seconds=TEST_HANG_SECONDS, seed=0) as client:
        yield client
