"""Sending a signal (`jobs.signal`, `oncelery signal`, `POST /signals/{name}`): recorded once
by its id; a job waiting for it is moved on in that transaction (`ledger.signals`) and its next
step published after the commit, or left in the signals' outbox, which the sweeper resends
(`jobs.engine.timers.resend_unsent`)."""

from __future__ import annotations

import logging

from jobs.engine.dispatch import Dispatch
from jobs.engine.runtime import Runtime
from jobs.engine.timers import step_after
from jobs.pipelines import registry
from ledger import JobState, NewSignal, SignalSent

logger = logging.getLogger(__name__)


def send_signal(rt: Runtime, dispatch: Dispatch, signal: NewSignal) -> SignalSent:
    """Record `signal`; if a job waits for its name and key, the oldest such wait ends
    (unless its timeout fired first) and the job's next step is published. A publish that
    fails stays in the outbox for the sweeper.

    Raises:
        SignalConflict: its id was recorded before with another key or other data.
        UnknownPipeline: the job waiting for it is of a pipeline this process does not
            declare (nothing is written: its next step cannot be told here).
    """
    sent = rt.signals.send(signal, route=_route)
    woke = sent.woke
    log = {"signal": signal.name, "signal_id": signal.signal_id}
    if woke is None:
        logger.info("signal %s", sent.outcome, extra={"action": f"signal_{sent.outcome}", **log})
        return sent
    job_id = str(woke.job_id)
    logger.info(
        "signal ended a wait",
        extra={"action": "signalled", "job_id": job_id, "step": woke.step, **log},
    )
    if woke.next_step is None or woke.job_state is not JobState.RUNNING:
        return sent
    try:
        dispatch.send(woke.pipeline, woke.next_step, job_id)
    except Exception as exc:  # noqa: BLE001 - left in the outbox for the sweeper
        logger.warning(
            "next step after a signal not sent; the sweeper will send it: %s",
            exc,
            extra={"action": "send_failed", "job_id": job_id, "step": woke.next_step},
        )
        return sent
    rt.signals.mark_sent([woke.job_id], woke.step)
    return sent


def _route(pipeline: str, step: str) -> str | None:
    registry.get(pipeline)  # UnknownPipeline: declared elsewhere, so not ours to move on
    return step_after(pipeline, step)
