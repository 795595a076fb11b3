"""Starting jobs: write the job rows, then publish their first steps; and the outbox relay, which
sends later what could not be sent then (the HTTP intake's thread, the sweeper's round)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from jobs.engine.admission import admitted, rules_for
from jobs.engine.dispatch import Dispatch, SendsMany
from jobs.engine.runtime import Runtime
from jobs.pipelines import Delivery, Pipeline, registry
from ledger import (
    JSON,
    DeadLetterReason,
    JobStore,
    JobToSend,
    LimitRules,
    NewJob,
    Reading,
    first_reading,
)

logger = logging.getLogger(__name__)

#: Jobs created, sent and marked dispatched together.
_SLICE = 200


@dataclass(frozen=True)
class Enqueued:
    """One event's job: its id, whether this call created it (False: seen before), and whether
    its first step was published or, limited, waits in line for its key (when not, the job
    waits in the outbox for the relay)."""

    job_id: str
    created: bool
    sent: bool = True


def start_jobs(
    store: JobStore, dispatch: Dispatch, pipeline: Pipeline[object], new_jobs: Sequence[NewJob]
) -> list[Enqueued]:
    """Create the jobs (deduplicated by event id), then publish the first step of each new one.

    Raises:
        EventConflict: an event id came with other content than before; no job was created.
    """
    # The job row is committed before anything is sent: the broker never holds the only
    # copy. A send that fails puts the job in the outbox (`dispatched_at` NULL) for the relay;
    # a message lost after it was sent, or a crash between commit and send, is the sweeper's.
    # One transaction for the lot: a conflict anywhere in the input creates nothing.
    created = store.create_jobs(new_jobs, dispatched=True)
    rules = rules_for(pipeline, pipeline.steps[0])
    answer: list[Enqueued] = []
    # Sent in slices, so a send that failed goes back to the outbox moments later, not after
    # the whole input.
    for start in range(0, len(new_jobs), _SLICE):
        end = start + _SLICE
        answer.extend(
            _send_slice(store, dispatch, (pipeline, rules), new_jobs[start:end], created[start:end])
        )
    return answer


def _send_slice(
    store: JobStore,
    dispatch: Dispatch,
    limited: tuple[Pipeline[object], LimitRules | None],
    new_jobs: Sequence[NewJob],
    created: Sequence[tuple[UUID, bool]],
) -> list[Enqueued]:
    pipeline, rules = limited
    first = pipeline.steps[0]
    fresh = [str(job_id) for job_id, is_new in created if is_new]
    if rules is not None:
        # A limited first step: a key's backlog waits in line in the ledger (its timers send
        # it, counted as sent), not in the queue ahead of other keys' jobs.
        runs = [
            (str(job_id), job.context)
            for job, (job_id, is_new) in zip(new_jobs, created, strict=True)
            if is_new
        ]
        fresh = admitted(store.engine, first, rules, runs)
    readings = {}
    if first.delivery is Delivery.READ_ONLY:
        # The job was just written: its first message can bring what reading it would find.
        readings = {
            str(job_id): first_reading(job_id, first.name, job.step_keys[first.name], job.context)
            for job, (job_id, is_new) in zip(new_jobs, created, strict=True)
            if is_new
        }
    unsent = set(_send_first_steps(dispatch, pipeline.name, first.name, fresh, readings))
    for job_id in unsent:
        logger.warning(
            "job %s stored but not sent; the relay will send it",
            job_id,
            extra={"action": "send_failed", "job_id": job_id, "step": first.name},
        )
    # Created as dispatched, to spare a statement per job; those whose send failed go back to
    # the outbox (a crash before this point leaves them to the sweeper instead).
    store.undo_dispatched([UUID(job_id) for job_id in unsent])
    return [Enqueued(str(job_id), is_new, str(job_id) not in unsent) for job_id, is_new in created]


def _send_first_steps(
    dispatch: Dispatch,
    pipeline: str,
    step: str,
    job_ids: Sequence[str],
    readings: Mapping[str, Reading],
) -> list[str]:
    """Publish the first step of each job (with its reading, if the dispatch carries them);
    the job ids whose publish failed."""
    if isinstance(dispatch, SendsMany):
        return dispatch.send_many(pipeline, step, job_ids, readings=readings)
    return send_each(dispatch, pipeline, step, job_ids)


def send_each(dispatch: Dispatch, pipeline: str, step: str, job_ids: Sequence[str]) -> list[str]:
    """Publish a step of each job, one by one; the job ids whose publish failed."""
    unsent = []
    for job_id in job_ids:
        try:
            dispatch.send(pipeline, step, job_id)
        except Exception as exc:  # noqa: BLE001 - the job is stored; the relay sends it
            logger.warning("publishing job %s failed: %s", job_id, exc)
            unsent.append(job_id)
    return unsent


#: Outbox jobs taken (and sent) at a time.
_RELAY_BATCH = 500
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
        confirms awaited once rather than once each. A limited first step's backlog of a key
        waits in line in the ledger instead (counted as sent: its timers send it)."""
        step = self.first_step(pipeline)
        waiting: list[UUID] = []
        if pipeline in registry:
            found = registry.get(pipeline)
            rules = self.rt.limits_for(pipeline, found.step(step))
            if rules is not None:
                contexts = self.rt.store.contexts(job_ids)
                runs = [(str(job_id), contexts.get(job_id, {})) for job_id in job_ids]
                now = set(admitted(self.rt.engine, found.step(step), rules, runs))
                waiting = [job_id for job_id in job_ids if str(job_id) not in now]
                job_ids = [job_id for job_id in job_ids if str(job_id) in now]
        return waiting + self._publish(pipeline, step, job_ids)

    def _publish(self, pipeline: str, step: str, job_ids: list[UUID]) -> list[UUID]:
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


def relay(rt: Runtime, dispatch: Dispatch, *, older_than: float | None = None) -> int:
    """Send the first step of jobs the broker never got (the outbox) once they are
    `older_than` seconds old (the settings' `relay_after` by default); returns how many. A
    failed send puts the job back, and ends the round: the broker is likely down."""
    after = rt.settings.relay_after if older_than is None else older_than
    sent = 0
    while True:
        taken = rt.store.take_undispatched(older_than=after, limit=_RELAY_BATCH)
        sent_now, failed = send_taken(rt, dispatch, taken)
        sent += sent_now
        if failed or len(taken) < _RELAY_BATCH:
            return sent


def send_taken(rt: Runtime, dispatch: Dispatch, taken: Sequence[JobToSend]) -> tuple[int, bool]:
    """Send the first step of jobs taken from the outbox; returns how many were sent, and
    whether a send failed. After a failure the rest go back untried with it (the broker is
    likely down: each try would wait for it)."""
    failed: list[UUID] = []
    sent = 0
    for job in taken:
        if job.step is None or job.pipeline not in registry:
            _dead_letter_unroutable(rt, job)
            continue
        if failed:
            failed.append(job.job_id)
            continue
        try:
            dispatch.send(job.pipeline, job.step, str(job.job_id))
        except Exception as exc:  # noqa: BLE001 - back to the outbox for the next round
            failed.append(job.job_id)
            logger.warning(
                "relay of %s failed: %s",
                job.job_id,
                exc,
                extra={"action": "relay_failed", "job_id": str(job.job_id)},
            )
        else:
            sent += 1
    rt.store.undo_dispatched(failed)
    return sent, bool(failed)


def _dead_letter_unroutable(rt: Runtime, job: JobToSend) -> None:
    """Dead-letter an outbox job this process cannot route (its pipeline is not loaded here):
    a person sees it in `dlq list`, loads the pipeline and replays it. Not left in the
    outbox, where the relay would take it again every round (and enough of them would fill
    every batch); never counted as sent."""
    message = (
        f"pipeline {job.pipeline!r} is not loaded where the outbox relay runs, so its job "
        f"cannot be sent: add its module to ONCELERY_PIPELINES there (and in the workers), "
        f"then replay this dead letter"
    )
    if job.step is None:
        message = f"job of pipeline {job.pipeline!r} has no step to send"
    logger.error(
        "outbox job %s not sent: %s",
        job.job_id,
        message,
        extra={"action": "relay_unroutable", "job_id": str(job.job_id)},
    )
    error: JSON = {"type": "UnknownPipeline", "message": message}
    rt.ledger.dead_letter(
        job.job_id, job.step or "-", error, reason=DeadLetterReason.UNKNOWN_PIPELINE
    )
