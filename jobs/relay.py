"""The outbox relay of the HTTP intake: a thread that hands newly accepted jobs to the broker.

The intake only writes the job (its row is the outbox: `dispatched_at` is NULL) and answers;
this thread sends it moments later. If the broker is down, jobs wait in Postgres and go out
when it is back — a 202 never depends on the broker. Several API processes share the outbox
safely: rows are taken with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import threading

from jobs.runner import Dispatch
from jobs.runtime import Runtime
from jobs.sweeper import relay

logger = logging.getLogger(__name__)

#: Seconds between two looks at the outbox when nothing wakes the relay.
_IDLE = 1.0
#: Seconds to wait after the broker refused a send.
_BACKOFF = 2.0


class OutboxRelay:
    """Sends outbox jobs in a background thread.

    Args:
        rt: the process's runtime (its store).
        dispatch: how jobs are sent.
    """

    def __init__(self, rt: Runtime, dispatch: Dispatch) -> None:
        self.rt = rt
        self.dispatch = dispatch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wake(self) -> None:
        """A job was accepted: look at the outbox now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread (it finishes the round under way)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_IDLE)
            self._wake.clear()
            try:
                relay(self.rt, self.dispatch, older_than=0.0)
            except Exception as exc:  # noqa: BLE001 - the relay must outlive a bad round
                logger.warning(
                    "outbox relay round failed: %s", exc, extra={"action": "relay_error"}
                )
                self._stop.wait(_BACKOFF)
