"""The outbox relay of the HTTP intake: a thread that hands newly accepted jobs to the broker.

The intake only writes the job (its row is the outbox: `dispatched_at` is NULL) and answers;
this thread sends it moments later. If the broker is down, jobs wait in Postgres and go out
when it is back — a 202 never depends on the broker. Several API processes share the outbox
safely: rows are taken with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from uuid import UUID

from jobs.dispatch import Dispatch, SendsMany
from jobs.runtime import Runtime
from jobs.sweeper import relay

logger = logging.getLogger(__name__)

#: Seconds between two looks at the accepted jobs when none arrive.
_IDLE = 1.0
#: Seconds to wait after the broker refused a send.
_BACKOFF = 2.0


class OutboxRelay:
    """Sends outbox jobs in a background thread: at once the jobs this process accepted, and,
    every `relay_after` seconds, any job left in the outbox (by a failed send here or
    elsewhere). Jobs other processes are sending right now are left to them.

    Args:
        rt: the process's runtime (its store).
        dispatch: how jobs are sent.
        first_step: the step each accepted job starts with, by pipeline.
    """

    def __init__(self, rt: Runtime, dispatch: Dispatch, first_step: Callable[[str], str]) -> None:
        self.rt = rt
        self.dispatch = dispatch
        self.first_step = first_step
        self._accepted: queue.SimpleQueue[tuple[str, UUID]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def accepted(self, pipeline: str, job_id: UUID) -> None:
        """A job was accepted here: send it now."""
        self._accepted.put((pipeline, job_id))

    def stop(self) -> None:
        """Stop the thread (it finishes the round under way)."""
        self._stop.set()
        self._accepted.put(("", UUID(int=0)))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            try:
                self._send_accepted(timeout=_IDLE)
                if time.monotonic() >= next_sweep:
                    relay(self.rt, self.dispatch)
                    next_sweep = time.monotonic() + self.rt.settings.relay_after
            except Exception as exc:  # noqa: BLE001 - the relay must outlive a bad round
                logger.warning(
                    "outbox relay round failed: %s", exc, extra={"action": "relay_error"}
                )
                self._stop.wait(_BACKOFF)

    def _send_accepted(self, *, timeout: float) -> None:
        """Send what was accepted since the last round (waiting up to `timeout` for it); a
        job whose send fails stays in the outbox for the periodic round."""
        by_pipeline: dict[str, list[UUID]] = {}
        try:
            pipeline, job_id = self._accepted.get(timeout=timeout)
            while True:
                if pipeline:
                    by_pipeline.setdefault(pipeline, []).append(job_id)
                pipeline, job_id = self._accepted.get_nowait()
        except queue.Empty:
            pass
        sent: list[UUID] = []
        for pipeline, job_ids in by_pipeline.items():
            sent += self._send(pipeline, job_ids)
        self.rt.store.mark_dispatched(sent)

    def _send(self, pipeline: str, job_ids: list[UUID]) -> list[UUID]:
        """Send the first step of jobs of one pipeline; those sent. Under load many arrive
        between two rounds: on a dispatch that can, they go out together, their publisher
        confirms awaited once rather than once each."""
        step = self.first_step(pipeline)
        if isinstance(self.dispatch, SendsMany):
            unsent = set(self.dispatch.send_many(pipeline, step, [str(j) for j in job_ids]))
            if unsent:
                logger.warning(
                    "send of %d jobs failed; they wait in the outbox",
                    len(unsent),
                    extra={"action": "relay_failed"},
                )
            return [job_id for job_id in job_ids if str(job_id) not in unsent]
        sent = []
        for job_id in job_ids:
            try:
                self.dispatch.send(pipeline, step, str(job_id))
            except Exception as exc:  # noqa: BLE001 - the broker is likely down
                logger.warning(
                    "send of %s failed (%s); it waits in the outbox",
                    job_id,
                    exc,
                    extra={"action": "relay_failed", "job_id": str(job_id)},
                )
                break
            sent.append(job_id)
        return sent
