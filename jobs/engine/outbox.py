"""The relay that sends, moments after their caller commits, the jobs a caller's own
transaction enqueued (`jobs.enqueue(…, connection=…)`): on Postgres it hears them announced at
the commit; everywhere it also sends, every `relay_after` seconds, whatever the outbox holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Final
from uuid import UUID

from jobs.engine.dispatch import Dispatch
from jobs.engine.enqueue import relay, send_taken
from jobs.engine.runtime import Runtime
from ledger import OUTBOX_CHANNEL, Listener

logger = logging.getLogger(__name__)

#: Seconds to wait after a round failed (the database or the broker is likely down).
_BACKOFF: Final = 2.0


def relay_announced(rt: Runtime, dispatch: Dispatch, job_ids: Sequence[UUID]) -> int:
    """Send the first step of announced jobs still in the outbox; returns how many were sent.
    A failed send puts the job, and those after it, back in the outbox for the next periodic
    round (the broker is likely down: each try would wait for it)."""
    sent, _ = send_taken(rt, dispatch, rt.store.take_announced(job_ids))
    return sent


def relay_forever(rt: Runtime, dispatch: Dispatch, stop: threading.Event) -> None:
    """Relay the outbox until `stop` is set: announced jobs at once (Postgres), and every
    `relay_after` seconds any job older than that (announcements missed while the listening
    connection was down, jobs whose send failed, SQLite)."""
    listener: Listener | None = None
    next_round = time.monotonic()
    while not stop.is_set():
        try:
            if listener is None and rt.engine.dialect.name == "postgresql":
                listener = Listener(rt.engine, [OUTBOX_CHANNEL])
            left = max(0.0, next_round - time.monotonic())
            if listener is not None:
                heard = listener.wait(left)
                relay_announced(rt, dispatch, _job_ids(heard))
            else:
                stop.wait(left)
            if time.monotonic() >= next_round:
                relay(rt, dispatch)
                next_round = time.monotonic() + rt.settings.relay_after
        except Exception as exc:  # noqa: BLE001 - the relay must outlive a bad round
            logger.warning("outbox relay failed: %s", exc, extra={"action": "relay_error"})
            if listener is not None:
                listener.close()
                listener = None
            stop.wait(_BACKOFF)
    if listener is not None:
        listener.close()


def _job_ids(payloads: Sequence[str]) -> list[UUID]:
    ids = []
    for payload in payloads:
        for part in payload.split(","):
            try:
                ids.append(UUID(part))
            except ValueError:
                logger.warning("outbox announcement %r is no job id", part)
    return ids
