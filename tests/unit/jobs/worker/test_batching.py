"""The worker side of batches: which queued messages go to a pool child together, and how each
message is acknowledged from its job's outcome — with a pool and requests that record calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback  # type: ignore[attr-defined]
from celery import Task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.request import Request

from config import MAIN_QUEUE, RETRY_QUEUE
from jobs.engine.run import Outcome
from jobs.worker.batching import MALFORMED, Batcher, Slots, run_batch


@dataclass(eq=False)  # hashable, as Celery's worker state keeps requests in sets
class FakeRequest:
    """The parts of a Celery request a batch uses; records how it was ended."""

    job_id: str
    redelivered: bool = False
    #: The queue it came by (`oncelery.retry`: sent again, by a retry or the sweeper).
    routing_key: str = MAIN_QUEUE
    time_limits: tuple[float | None, float | None] = (35.0, 30.0)
    ended: list[tuple[str, object]] = field(default_factory=list)
    #: The message's arguments, if not the usual `[job_id]`.
    positional: list[object] | None = None
    kwargs: dict[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"task-{self.job_id}"

    @property
    def args(self) -> list[object]:
        return [self.job_id] if self.positional is None else self.positional

    @property
    def delivery_info(self) -> dict[str, object]:
        return {"redelivered": self.redelivered, "routing_key": self.routing_key}

    @property
    def request_dict(self) -> dict[str, object]:
        return {"id": self.id}

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.ended.append(("accepted", pid))

    def on_success(self, failed_retval_runtime: tuple[bool, object, float]) -> None:
        self.ended.append(("success", failed_retval_runtime[1]))

    def on_failure(self, exc_info: ExceptionInfo) -> None:
        # Celery unwraps it the same way (`Request.on_failure`).
        exc = exc_info.exception
        self.ended.append(("failure", exc.exc if isinstance(exc, ExceptionWithTraceback) else exc))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        self.ended.append(("timeout", soft))

    def reject(self, requeue: bool = False) -> None:
        self.ended.append(("rejected", requeue))


@dataclass
class Applied:
    """One batch handed to the pool."""

    job_ids: list[str]
    options: dict[str, Any]
    repeats: list[bool]

    def finish(self, outcomes: list[str]) -> None:
        callback: Callable[[list[tuple[str, float]]], None] = self.options["callback"]
        callback([(outcome, 0.01) for outcome in outcomes])


@dataclass
class FakePool:
    num_processes: int = 2
    applied: list[Applied] = field(default_factory=list)

    def apply_async(
        self,
        target: object,
        args: tuple[str, list[tuple[str, object, object]], list[bool], list[object]],
        **options: Any,
    ) -> None:
        assert target is run_batch
        # Each message as it came: its id (here "task-<job id>"), arguments, keywords.
        job_ids = [message_id.removeprefix("task-") for message_id, _, _ in args[1]]
        self.applied.append(Applied(job_ids, options, list(args[2])))


def batcher(size: int = 4, processes: int = 2) -> tuple[Batcher, FakePool]:
    pool = FakePool(num_processes=processes)
    task = cast(Task[Any, Any], type("T", (), {"name": "oncelery.p.s", "time_limit": None})())
    task.soft_time_limit = None
    return Slots(pool).batcher(task, size), pool


def add(batches: Batcher, *requests: FakeRequest) -> None:
    for request in requests:
        batches.add(cast(Request, request))


def test_a_message_goes_at_once_while_a_child_is_free() -> None:
    batches, pool = batcher()

    add(batches, FakeRequest("a"))

    assert [a.job_ids for a in pool.applied] == [["a"]]


def test_messages_wait_while_every_child_is_busy_then_go_together() -> None:
    batches, pool = batcher(size=3)
    add(batches, FakeRequest("a"), FakeRequest("b"))
    add(batches, *(FakeRequest(name) for name in "cdefg"))
    assert [a.job_ids for a in pool.applied] == [["a"], ["b"]]

    pool.applied[0].finish([Outcome.SUCCEEDED])

    # The freed child takes the next three; the rest wait for the next free child.
    assert [a.job_ids for a in pool.applied][2:] == [["c", "d", "e"]]
    pool.applied[1].finish([Outcome.SUCCEEDED])
    assert [a.job_ids for a in pool.applied][3:] == [["f", "g"]]


def test_a_redelivered_message_runs_alone() -> None:
    batches, pool = batcher(size=8, processes=1)
    add(batches, FakeRequest("busy"))
    add(batches, FakeRequest("a"), FakeRequest("again", redelivered=True), FakeRequest("b"))

    pool.applied[0].finish([Outcome.SUCCEEDED])
    pool.applied[1].finish([Outcome.SUCCEEDED])
    pool.applied[2].finish([Outcome.SUCCEEDED])

    assert [a.job_ids for a in pool.applied] == [["busy"], ["a"], ["again"], ["b"]]
    # The child claims the repeated message's step whatever its delivery (attempts count).
    assert [a.repeats for a in pool.applied] == [[False], [False], [True], [False]]


def test_a_message_sent_again_runs_alone() -> None:
    # Given a busy child, then fresh messages around one the sweeper re-drove (a job whose
    # worker died on it may be poison: it must not take fresh neighbours down with it)
    batches, pool = batcher(size=8, processes=1)
    add(batches, FakeRequest("busy"))
    add(batches, FakeRequest("a"), FakeRequest("redriven", routing_key=RETRY_QUEUE))
    add(batches, FakeRequest("b"), FakeRequest("c"))

    for n in range(3):
        pool.applied[n].finish([Outcome.SUCCEEDED] * len(pool.applied[n].job_ids))

    assert [a.job_ids for a in pool.applied] == [["busy"], ["a"], ["redriven"], ["b", "c"]]
    assert [a.repeats for a in pool.applied] == [[False], [False], [True], [False, False]]


def test_each_message_ends_as_its_job_did() -> None:
    batches, pool = batcher(processes=1)
    requests = [FakeRequest(name) for name in ("busy", "ok", "dead", "broken")]
    add(batches, *requests)
    pool.applied[0].finish([Outcome.SUCCEEDED])
    [_, batch] = pool.applied
    batch.options["accept_callback"](1234, 0.0)

    batch.finish([Outcome.SUCCEEDED, Outcome.DEAD_LETTERED, Outcome.INTERRUPTED])

    ok, dead, interrupted = requests[1:]
    assert ok.ended == [("accepted", 1234), ("success", Outcome.SUCCEEDED)]
    [_, (how, exc)] = dead.ended
    # Rejected without requeueing: RabbitMQ's dead-letter queue keeps a copy.
    assert how == "failure"
    assert isinstance(exc, Reject)
    assert exc.requeue is False  # type: ignore[attr-defined]
    # Given back to the broker, to be delivered again alone.
    assert interrupted.ended[-1] == ("rejected", True)


def test_a_malformed_message_goes_with_its_neighbours_and_is_rejected_once() -> None:
    # Given a message with keyword arguments only, between two good ones, waiting for a child
    batches, pool = batcher(processes=1)
    keywords = FakeRequest("keywords", positional=[], kwargs={"job_id": "x"})
    requests = [FakeRequest("busy"), FakeRequest("a"), keywords, FakeRequest("b")]
    add(batches, *requests)

    # When the child is free, they go together (the child tells the bad one apart)
    pool.applied[0].finish([Outcome.SUCCEEDED])
    assert [a.job_ids for a in pool.applied] == [["busy"], ["a", "keywords", "b"]]
    pool.applied[1].finish([Outcome.SUCCEEDED, MALFORMED, Outcome.SUCCEEDED])

    # Then it is rejected without requeueing; its neighbours end as their jobs did
    [(how, exc)] = keywords.ended
    assert how == "failure"
    assert isinstance(exc, Reject)
    assert exc.requeue is False  # type: ignore[attr-defined]
    assert requests[1].ended == requests[3].ended == [("success", Outcome.SUCCEEDED)]


def test_a_batch_whose_child_died_gives_every_message_back() -> None:
    batches, pool = batcher(processes=1)
    requests = [FakeRequest(name) for name in "abc"]
    add(batches, *requests)
    lost = _exception_info(RuntimeError("worker lost"))

    pool.applied[0].options["error_callback"](lost)
    pool.applied[1].options["error_callback"](lost)

    # Each comes back from the broker marked redelivered, and runs alone then.
    assert [r.ended for r in requests] == [[("rejected", True)]] * 3
    assert [a.job_ids for a in pool.applied] == [["a"], ["b", "c"]]


def test_countdown_messages_and_every_step_share_the_children() -> None:
    pool = FakePool(num_processes=1)
    slots = Slots(pool)
    tasks = [
        cast(Task[Any, Any], type("T", (), {"name": name, "time_limit": None})())
        for name in ("oncelery.p.first", "oncelery.p.second")
    ]
    for task in tasks:
        task.soft_time_limit = None
    first, second = (slots.batcher(task, 4) for task in tasks)
    add(first, FakeRequest("a"))
    add(second, FakeRequest("b"))
    add(first, FakeRequest("c"))

    # One child: the second step's message waits, though its own batcher runs nothing.
    assert [a.job_ids for a in pool.applied] == [["a"]]
    pool.applied[0].finish([Outcome.SUCCEEDED])
    # The oldest waiting message's step goes first.
    assert [a.job_ids for a in pool.applied] == [["a"], ["b"]]


def test_a_batch_gets_the_time_of_all_its_messages() -> None:
    batches, pool = batcher(processes=1)
    add(batches, FakeRequest("busy"))
    add(batches, FakeRequest("a", time_limits=(10.0, 8.0)), FakeRequest("b"))
    pool.applied[0].finish([Outcome.SUCCEEDED])

    # The steps are timed in the child; the pool's limits only back that up, after it.
    options = pool.applied[1].options
    assert (options["soft_timeout"], options["timeout"]) == (45.0, 50.0)


def test_a_worker_shutting_down_takes_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    batches, pool = batcher()
    # Celery's warm shutdown sets its exit code, 0.
    monkeypatch.setattr(worker_state, "should_stop", 0)

    add(batches, FakeRequest("a"))

    assert pool.applied == []
    assert len(batches.waiting) == 1


def _exception_info(exc: Exception) -> ExceptionInfo:
    try:
        raise exc
    except RuntimeError:
        return ExceptionInfo()
