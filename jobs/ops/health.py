"""What `GET /healthz` knows: whether the database and the broker answer, each asked from a
thread of its own with a deadline, so a hung dependency makes the answer "unavailable" within
the deadline and never holds the event loop, the request, or the next check."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

logger = logging.getLogger(__name__)

#: What `/healthz` says of a dependency that answered.
OK: Final = "ok"
#: What it says of one that failed or did not answer in time (the detail goes to the log:
#: error texts name hosts, users and versions, and `/healthz` needs no token).
UNAVAILABLE: Final = "unavailable"


class Probe:
    """Checks one dependency: `check` runs in a thread of its own; a check still running
    after `deadline` seconds counts as unavailable, and no second one starts until it ends
    (a hung server is not handed one more stuck thread per request).

    Args:
        name: the dependency, as `/healthz` names it.
        check: returns if the dependency answers, raises otherwise (blocking).
        deadline: seconds a check may take.
    """

    def __init__(self, name: str, check: Callable[[], None], *, deadline: float) -> None:
        self.name = name
        self.check = check
        self.deadline = deadline
        self._lock = threading.Lock()
        self._running: concurrent.futures.Future[None] | None = None
        self._started = 0.0

    async def status(self) -> str:
        """`OK` or `UNAVAILABLE`, within `deadline` seconds."""
        future, started = self._current()
        left = started + self.deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(left, 0.0))
        except TimeoutError:
            self._unavailable(f"no answer within {self.deadline:g}s")
            return UNAVAILABLE
        except Exception as exc:  # noqa: BLE001 - any failure means unavailable; logged
            self._unavailable(f"{type(exc).__name__}: {exc}")
            return UNAVAILABLE
        return OK

    def _current(self) -> tuple[concurrent.futures.Future[None], float]:
        """The check under way (however late), or a new one."""
        with self._lock:
            if self._running is None or self._running.done():
                self._running = concurrent.futures.Future()
                self._started = time.monotonic()
                threading.Thread(
                    target=self._run, args=(self._running,), name=f"health-{self.name}", daemon=True
                ).start()
            return self._running, self._started

    def _run(self, future: concurrent.futures.Future[None]) -> None:
        try:
            self.check()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            future.set_exception(exc)
        else:
            future.set_result(None)

    def _unavailable(self, detail: str) -> None:
        logger.warning(
            "health: %s unavailable: %s",
            self.name,
            detail,
            extra={"action": "health_unavailable", "dependency": self.name},
        )
