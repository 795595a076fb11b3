"""Runs the sandbox provider under uvicorn in the current process until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import uvicorn

from .app import create_app
from .faults import Faults
from .store import SandboxStore
from .world import DEFAULT_SEED

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for in-flight requests on shutdown. Hanging requests (timeouts, lost
#: replies) are already recorded and their effects committed, so they need not be waited for.
GRACEFUL_SHUTDOWN_SECONDS = 1

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(
    host: str,
    port: int,
    db_path: Path,
    faults: Faults,
    honour_keys: bool,
    hang_seconds: float,
    *,
    places_seed: int = DEFAULT_SEED,
    places_rate: int | None = None,
) -> None:
    """Serve the sandbox provider until SIGTERM or SIGINT, then return.

    One process, one event loop (the idempotency guarantee relies on it), uvicorn at log level
    warning with the access log off.

    Args:
        host: The interface to bind.
        port: The TCP port to bind.
        db_path: The sandbox's SQLite file, created if missing and kept across restarts.
        faults: The global faults at start.
        honour_keys: Whether `Idempotency-Key` deduplicates.
        hang_seconds: How long a timeout or a lost reply hangs before answering 504.
        places_seed: Seed of the places world.
        places_rate: The most places searches admitted per second; `None`: no cap.
    """
    store = SandboxStore(db_path)
    try:
        app = create_app(
            store,
            faults,
            honour_keys,
            hang_seconds,
            places_seed=places_seed,
            places_rate=places_rate,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            workers=1,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        logger.info(
            "sandbox provider on http://%s:%d, store %s",
            host,
            port,
            db_path,
            extra={"action": "sandbox.start"},
        )
        with _absorb_reraised_stop_signals():
            uvicorn.Server(config).run()
    finally:
        store.close()
    logger.info("sandbox provider stopped", extra={"action": "sandbox.stop"})


@contextmanager
def _absorb_reraised_stop_signals() -> Iterator[None]:
    # uvicorn handles SIGINT/SIGTERM itself, shuts down, then re-raises the signal against the
    # handlers it found installed; with the defaults that kills the process (SIGTERM) or raises
    # KeyboardInterrupt (SIGINT) before we can close the store. Installing a handler that only
    # notes the signal lets serve() return normally instead.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _note_stop_signal) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _note_stop_signal(signum: int, frame: FrameType | None) -> None:
    del frame
    logger.info(
        "sandbox provider got %s", signal.Signals(signum).name, extra={"action": "sandbox.signal"}
    )
