"""Batches: a prefork worker hands the queued messages of one step to a pool child together,
which runs them with one round trip per stage for the lot instead of one per job."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final

from billiard.einfo import ExceptionInfo
from celery import Celery, Task
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker.state import task_ready, task_reserved
from celery.worker.strategy import default as default_strategy

from config import BATCH_SIZE_SETTING
from jobs.engine.dispatch import READING_HEADER
from jobs.engine.run import Outcome
from jobs.engine.runtime import Runtime
from jobs.engine.step_messages import Malformed, job_id_of, reject_malformed
from jobs.worker.app import runtime
from jobs.worker.steps import is_repeat, run_batch_of
from jobs.worker.time_limits import step_timer

logger = logging.getLogger(__name__)

#: Seconds between a batch's soft and hard backstop limits.
_BACKSTOP_GRACE: Final = 5.0
#: A batch's answer for a message that cannot be run: rejected, never requeued.
MALFORMED: Final = "malformed"


def strategy(task: Task[Any, Any], app: Celery, consumer: Consumer, **options: Any) -> Any:
    """The step tasks' Celery strategy: Celery's own, except that a message ready to run (at
    once, or when its countdown is up) goes to the step's `Batcher` rather than straight to
    the pool one by one. Other pools than prefork, and a batch size of 1, keep Celery's own.
    All of batching happens on the worker's event loop (one thread): a worker without one (the
    embedded file broker) takes its messages one by one."""
    size = int(app.conf.get(BATCH_SIZE_SETTING) or 1)
    # Without the event loop (the embedded file broker), the pool calls back from threads
    # of its own and may block them waiting for a free child: batches need the loop, where
    # messages, pool results and timers all come to one thread.
    loop = getattr(consumer, "hub", None)  # celery-types does not declare it
    if size <= 1 or not isinstance(consumer.pool, PreforkPool) or loop is None:
        return default_strategy(task, app, consumer, **options)
    batcher = Slots.of(consumer, task.name).batcher(task, size)
    return default_strategy(task, app, _Redirected(consumer, batcher.add), **options)


class _Redirected:
    """A consumer whose ready requests go to a batcher; everything else is the consumer's."""

    def __init__(self, consumer: Consumer, on_task_request: Callable[[Request], None]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def apply_eta_task(self, request: Request) -> None:
        """A message whose countdown is up (a retry, say): as Celery's own consumer does,
        but to the batcher."""
        task_reserved(request)
        self.on_task_request(request)
        self._consumer.qos.decrement_eventually()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class Slots:
    """A worker's pool children as batches see them: how many batches run, and every step
    task's batcher, served oldest message first when a child frees up.

    Args:
        pool: the worker's prefork pool.
    """

    #: Each worker consumer's slots (rebuilt when Celery rebuilds its strategies, after a
    #: lost connection: what waited then is redelivered by the broker).
    _of: ClassVar[weakref.WeakKeyDictionary[Consumer, Slots]] = weakref.WeakKeyDictionary()

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.running = 0
        self.batchers: dict[str, Batcher] = {}
        self.arrivals = itertools.count()

    @classmethod
    def of(cls, consumer: Consumer, task_name: str) -> Slots:
        """The consumer's slots, new ones if `task_name` already has a batcher (a rebuild)."""
        found = cls._of.get(consumer)
        if found is None or task_name in found.batchers:
            found = cls._of[consumer] = cls(consumer.pool)
        return found

    def batcher(self, task: Task[Any, Any], size: int) -> Batcher:
        """A new batcher for a step task."""
        batcher = self.batchers[task.name] = Batcher(task, self, size)
        return batcher

    def flush(self) -> None:
        """Hand waiting messages to the free children, the oldest message's step first."""
        while self.running < self.pool.num_processes and not _stopping():
            waiting = [b for b in self.batchers.values() if b.waiting]
            if not waiting:
                return
            min(waiting, key=lambda b: b.waiting[0][0]).apply_next()


class Batcher:
    """The messages of one step task that wait for a pool child. While a child is free, a
    message goes at once (alone, so an idle worker answers as fast as ever); while all are
    busy, messages wait, and the next free child takes up to `ONCELERY_BATCH_SIZE` of them in
    one go.

    Args:
        task: the step's task.
        slots: the worker's children, shared with the other steps' batchers.
        size: the most messages one batch takes.
    """

    def __init__(self, task: Task[Any, Any], slots: Slots, size: int) -> None:
        self.task = task
        self.slots = slots
        self.size = size
        #: (arrival number, request), oldest first.
        self.waiting: deque[tuple[int, Request]] = deque()

    def add(self, request: Request) -> None:
        """A message ready to run (Celery has reserved it; it is acknowledged later)."""
        self.waiting.append((next(self.slots.arrivals), request))
        self.slots.flush()

    def apply_next(self) -> None:
        """Hand the next batch to the pool."""
        batch = self._next_batch()
        self.slots.running += 1
        try:
            self._apply(batch)
        except Exception:
            logger.exception("handing a batch to the pool failed", extra={"action": "batch_failed"})
            self._done(lambda: _requeue_all(batch))

    def _next_batch(self) -> list[Request]:
        # A batch whose child dies is redelivered message by message, and a message that may
        # repeat an attempt always runs alone: a job that kills its worker cannot take its
        # neighbours down with it twice. That includes the sweeper's re-drives and the retry
        # queue's, not only the broker's redeliveries: a poison job re-driven into a batch of
        # fresh ones cost each of them an attempt every time (an innocent job dead-lettered
        # beside the poison one, under load).
        if _may_repeat(self.waiting[0][1]):
            return [self.waiting.popleft()[1]]
        batch: list[Request] = []
        while self.waiting and len(batch) < self.size and not _may_repeat(self.waiting[0][1]):
            batch.append(self.waiting.popleft()[1])
        return batch

    def _apply(self, batch: list[Request]) -> None:
        # Each step is bounded in the child by its own limit (`step_timer`); the pool's limits
        # are a backstop that must never strike first (a soft limit striking while an
        # attempt is recorded would cut the record): the messages' hard limits summed, then
        # a grace more for the hard one.
        soft = sum(r.time_limits[0] or self.task.time_limit or 0 for r in batch)
        hard = soft + _BACKSTOP_GRACE if soft else 0

        def accepted(pid: Any, time_accepted: float) -> None:
            for request in batch:
                request.on_accepted(pid, time_accepted)

        def finished(answers: list[tuple[str, float]]) -> None:
            self._done(lambda: _acknowledge_all(batch, answers))

        def failed(_exc_info: ExceptionInfo) -> None:
            # The child died, or ran out of time: every message goes back to the broker, to
            # be delivered again alone (the ledger knows how far each job got).
            self._done(lambda: _requeue_all(batch))

        def timed_out(soft: bool, timeout: float) -> None:
            for request in batch:
                request.on_timeout(soft, timeout)

        self.slots.pool.apply_async(
            run_batch,
            args=(
                self.task.name,
                # As they came: the child tells a job id from a message that carries none.
                [(r.id, r.args, r.kwargs) for r in batch],
                [is_repeat(r.delivery_info or {}) for r in batch],
                [r.request_dict.get(READING_HEADER) for r in batch],
            ),
            accept_callback=accepted,
            callback=finished,
            error_callback=failed,
            timeout_callback=timed_out,
            soft_timeout=soft or None,
            timeout=hard or None,
            correlation_id=batch[0].id,
        )

    def _done(self, acknowledge: Callable[[], None]) -> None:
        """A batch is over: end its messages, then give its child to what waits."""
        self.slots.running -= 1
        try:
            acknowledge()
        finally:
            self.slots.flush()


def _stopping() -> bool:
    # Celery sets these on shutdown, to an exit code (0 for a warm shutdown), as its own
    # `maybe_shutdown` reads them; celery-types declares them as always None.
    flags = (getattr(worker_state, name) for name in ("should_stop", "should_terminate"))
    return any(flag is not None and flag is not False for flag in flags)


def _may_repeat(request: Request) -> bool:
    return is_repeat(request.delivery_info or {})


def _acknowledge_all(batch: Sequence[Request], answers: Sequence[tuple[str, float]]) -> None:
    """End each message of a finished batch on its own (acknowledged or rejected), now that its
    job's outcome is recorded."""
    for request, (outcome, seconds) in zip(batch, answers, strict=True):
        try:
            _acknowledge(request, outcome, seconds)
        except Exception:
            logger.exception("ending message %s failed", request.id)


def _acknowledge(request: Request, outcome: str, runtime: float) -> None:
    """End a message of a finished batch as its own task would have ended."""
    if outcome == Outcome.DEAD_LETTERED:
        # The dead letter is in Postgres already; rejecting also hands RabbitMQ the message
        # for its dead-letter queue (other brokers drop it).
        request.on_failure(_exception_info(Reject("dead-lettered", requeue=False)))
    elif outcome == MALFORMED:
        # Requeued, it would come back forever: rejected once, to the dead-letter queue
        # where the broker has one (said and counted in the child).
        request.on_failure(_exception_info(Reject("malformed step message", requeue=False)))
    elif outcome == Outcome.INTERRUPTED:
        _requeue(request)
    else:
        request.on_success((False, outcome, runtime))


def _requeue_all(batch: Sequence[Request]) -> None:
    for request in batch:
        try:
            _requeue(request)
        except Exception:
            logger.exception("requeueing message %s failed", request.id)


def _requeue(request: Request) -> None:
    """Give the message back to the broker; it comes back marked redelivered, to run alone."""
    task_ready(request)
    request.reject(requeue=True)


def _exception_info(exc: Exception) -> ExceptionInfo:
    try:
        raise exc
    except Exception:  # noqa: BLE001 - captured for Celery's failure handling
        return ExceptionInfo()


def run_batch(
    task_name: str,
    messages: Sequence[tuple[str, object, object]],
    repeats: Sequence[bool],
    headers: Sequence[object],
) -> list[tuple[str, float]]:
    """In a pool child: run one batch (`messages`: each message's id, positional and keyword
    arguments; `repeats`: which may repeat an attempt; `headers`: each one's reading header,
    if any); each message's outcome (`MALFORMED` for one that cannot be run) and the
    batch's seconds so far.

    The jobs run with `jobs.engine.run.run_steps`: one round trip per stage for the lot,
    instead of one per job, and one pool hand-off instead of one per message. A message that
    cannot be run (`jobs.engine.step_messages`) is rejected on its own, never requeued,
    while its neighbours run."""
    started = time.monotonic()
    checked = [job_id_of(args, kwargs) for _, args, kwargs in messages]
    for (message_id, _, _), found in zip(messages, checked, strict=True):
        if isinstance(found, Malformed):
            reject_malformed(_runtime_or_none(), task_name, message_id, found)
    # The jobs to run, by their message's place in the batch.
    runs = {index: found for index, found in enumerate(checked) if isinstance(found, str)}
    job_ids = list(runs.values())
    ran = _run_jobs(
        task_name, job_ids, [repeats[index] for index in runs], [headers[index] for index in runs]
    )
    outcomes = dict(zip(runs, ran, strict=True))
    seconds = time.monotonic() - started
    if len(job_ids) > 1:
        logger.info(
            "batch of %d %s messages run in %.3fs",
            len(job_ids),
            task_name,
            seconds,
            extra={"action": "batch", "step": task_name, "jobs": len(job_ids)},
        )
    return [(str(outcomes.get(index, MALFORMED)), seconds) for index in range(len(messages))]


def _run_jobs(
    task_name: str, job_ids: list[str], repeats: list[bool], headers: list[object]
) -> Sequence[str]:
    if not job_ids:
        return []
    try:
        return run_batch_of(task_name, job_ids, step_timer, repeats=repeats, headers=headers)
    except Exception:
        logger.exception("a batch of %s failed", task_name, extra={"action": "batch_failed"})
        return [Outcome.INTERRUPTED] * len(job_ids)


def _runtime_or_none() -> Runtime | None:
    # Where to count a malformed message; a runtime that cannot be built (bad settings) must
    # not keep the message from being rejected.
    try:
        return runtime()
    except Exception:  # counted or not, the message is rejected once
        logger.warning("no runtime to count a malformed message", exc_info=True)
        return None
