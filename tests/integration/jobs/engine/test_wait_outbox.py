"""The outbox of the moves past a wait (Postgres and SQLite): a fired timer's or a signal's
row whose publish was lost is resent as the step that move sent, and only while its job is
still there — never as whatever step the job is at by then."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from jobs.engine.run import Outcome, run_step
from jobs.engine.runtime import Runtime
from jobs.engine.signals import send_signal
from jobs.engine.timers import fire_round, resend_unsent
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.waits import Sleep, WaitForSignal
from ledger import JSON, NewSignal
from ledger.schema import signals, timers
from tests.factories import RecordingDispatch

_names = iter(range(10**6))


def _step(ctx: StepContext[None]) -> JSON:
    return {"word": ctx.context["word"]}


def four_steps(wait: Sleep[None] | WaitForSignal[None]) -> Pipeline[None]:
    """first, a wait, second, third: the job can be past the step after its wait and still
    running."""
    return Pipeline(
        name=f"outbox-{next(_names)}",
        steps=[
            Step("first", _step, key="o:{word}:first"),
            wait,
            Step("second", _step, key="o:{word}:second"),
            Step("third", _step, key="o:{word}:third"),
        ],
        resources=lambda _settings: None,
    )


def _sleep(rt: Runtime, pipeline: Pipeline[None], job_id: str) -> sa.Table:
    """The sleep's timer fires; its publish fails (left in the timers' outbox)."""
    assert fire_round(rt, RecordingDispatch(fail=True)) == 1
    return timers


def _signal(rt: Runtime, pipeline: Pipeline[None], job_id: str) -> sa.Table:
    """A signal ends the wait; its publish fails (left in the signals' outbox)."""
    word = str(rt.store.get_job(uuid.UUID(job_id)).context["word"])
    sent = send_signal(rt, RecordingDispatch(fail=True), NewSignal("shipped", word, "s-1"))
    assert sent.woke is not None
    return signals


WAITS: dict[
    str, tuple[Callable[[], Sleep[None] | WaitForSignal[None]], Callable[..., sa.Table]]
] = {
    "timer": (lambda: Sleep("wait", seconds=0), _sleep),
    "signal": (
        lambda: WaitForSignal("wait", signal="shipped", key="{word}", timeout=3600),
        _signal,
    ),
}


def moved_past_the_wait_unsent(rt: Runtime, ends: str) -> tuple[Pipeline[None], str, sa.Table]:
    """A job moved on from its wait to `second`, the publish of `second` lost, its outbox row
    older than `relay_after`."""
    wait, end = WAITS[ends]
    pipeline = four_steps(wait())
    context = {"word": uuid.uuid4().hex}
    [(job_id, _)] = rt.store.create_jobs([pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)])
    first = pipeline.step("first")
    assert run_step(rt, RecordingDispatch(), pipeline, first, str(job_id)) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    table = end(rt, pipeline, str(job_id))
    moved_at = table.c.fired_at if table is timers else table.c.consumed_at
    with rt.engine.begin() as conn:
        found = conn.execute(sa.select(table.c.id, moved_at).where(table.c.job_id == job_id))
        [(row, at)] = found
        assert isinstance(at, datetime)
        older = {moved_at.name: at - timedelta(seconds=60)}
        conn.execute(sa.update(table).where(table.c.id == row).values(older))
    assert rt.store.get_job(job_id).current_step == "second"
    return pipeline, str(job_id), table


def unsent(rt: Runtime, table: sa.Table) -> int:
    with rt.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(table.c.dispatched_at.is_(None))
        if table is timers:
            query = query.where(timers.c.state == "fired")
        else:
            query = query.where(signals.c.consumed_at.is_not(None))
        return int(conn.execute(query.select_from(table)).scalar_one())


@pytest.mark.parametrize("ends", ["timer", "signal"])
def test_a_lost_publish_is_resent_as_the_step_the_move_sent(runtime: Runtime, ends: str) -> None:
    pipeline, job_id, table = moved_past_the_wait_unsent(runtime, ends)
    dispatch = RecordingDispatch()

    outbox = runtime.timers if table is timers else runtime.signals
    assert resend_unsent(runtime, dispatch, outbox, after=ends) == 1

    assert (dispatch.sent, dispatch.resent) == ([(pipeline.name, "second", job_id)], [job_id])
    assert unsent(runtime, table) == 0
    assert resend_unsent(runtime, dispatch, outbox, after=ends) == 0  # taken once


@pytest.mark.parametrize("ends", ["timer", "signal"])
def test_a_lost_publish_of_a_job_gone_past_that_step_sends_nothing(
    runtime: Runtime, ends: str
) -> None:
    """`second`'s message was not lost after all (its publish was, from the mover's side): the
    job ran it and is at `third`. Resending the job's current step would be a second message
    of `third` that no move ever published."""
    pipeline, job_id, table = moved_past_the_wait_unsent(runtime, ends)
    dispatch = RecordingDispatch()
    second = pipeline.step("second")
    assert run_step(runtime, dispatch, pipeline, second, job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    assert dispatch.sent == [(pipeline.name, "third", job_id)]
    dispatch.sent.clear()

    outbox = runtime.timers if table is timers else runtime.signals
    assert resend_unsent(runtime, dispatch, outbox, after=ends) == 0

    assert dispatch.sent == []
    assert unsent(runtime, table) == 0  # taken: settled
