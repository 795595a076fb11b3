"""Sending a signal (`jobs.signal`, `oncelery signal`, `POST /signals/{name}`): recorded once
by its id; a job waiting for it is moved on in that transaction (`ledger.signals`) and its next
step published after the commit, or left in the signals' outbox, which the sweeper resends."""

from __future__ import annotations

import logging

from jobs.engine.dispatch import Dispatch
from jobs.engine.runtime import Runtime
from jobs.engine.timers import FIRE_BATCH, step_after
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


def resend_unsent_signals(rt: Runtime, dispatch: Dispatch) -> int:
    """Send again the next step of jobs a signal moved on whose publish was not confirmed
    within `relay_after` seconds (their sender died between its commit and the publish); how
    many were sent. A copy that was not lost after all is absorbed by the ledger."""
    pipelines = [pipeline.name for pipeline in registry]
    taken = rt.signals.take_unsent(
        older_than=rt.settings.relay_after, limit=FIRE_BATCH, pipelines=pipelines
    )
    failed: list[int] = []
    for signal_row, job_id, pipeline, step in taken:
        try:
            dispatch.send(pipeline, step, str(job_id), resend=True)
        except Exception as exc:  # noqa: BLE001 - back in the outbox for the next sweep
            logger.warning("resend of %s after its signal not sent: %s", job_id, exc)
            failed.append(signal_row)
            continue
        logger.warning(
            "resent the step after a signal",
            extra={"action": "signal_resent", "job_id": str(job_id), "step": step},
        )
    rt.signals.undo_sent(failed)
    return len(taken) - len(failed)
