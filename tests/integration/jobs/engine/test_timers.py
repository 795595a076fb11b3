"""Sleep steps and the timer loop on the real ledger (Postgres and SQLite), driven without
Celery: the timer row written with the record, fired once, cancelled with its job, two
loops racing, and a loop killed between its commit and its publish."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console

from jobs.engine.run import Outcome, run_step, run_steps
from jobs.engine.runtime import Runtime
from jobs.engine.sweeper import sweep
from jobs.engine.timers import fire_round
from jobs.ops.history import history_view
from jobs.ops.status import status_table, timers_view
from jobs.pipelines import Delivery, Pipeline, Step, StepContext
from jobs.retry import RetryPolicy
from jobs.waits import Sleep
from ledger import (
    JSON,
    DeadLetterStore,
    EventKind,
    JobState,
    JobStore,
    StepLedger,
    TimerLedger,
    TimerState,
    create_engine,
)
from ledger.schema import timers
from tests.conftest import REPO_ROOT, settings_for
from tests.factories import RecordingDispatch
from tests.toy_pipeline import toy_sleep
from tests.waiting import wait_for

_names = iter(range(10**6))


def _first(ctx: StepContext[None]) -> JSON:
    return {"word": ctx.context["word"]}


def _second(ctx: StepContext[None]) -> JSON:
    return {"after": ctx.results["nap"]}


def sleeping(seconds: float | None = None, until: str | None = None) -> Pipeline[None]:
    return Pipeline(
        name=f"sleeper-{next(_names)}",
        steps=[
            Step("first", _first, key="s:{word}:first"),
            Sleep("nap", seconds=seconds, until=until),
            Step("second", _second, key="s:{word}:second"),
        ],
        resources=lambda _settings: None,
    )


def start(rt: Runtime, pipeline: Pipeline[None], **context: object) -> str:
    context.setdefault("word", uuid.uuid4().hex)
    new = pipeline.new_job(f"evt-{uuid.uuid4().hex}", context)  # type: ignore[arg-type]
    [(job_id, _)] = rt.store.create_jobs([new])
    return str(job_id)


def timer_rows(engine: sa.Engine, job_id: str) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        query = sa.select(timers).where(timers.c.job_id == uuid.UUID(job_id))
        return list(conn.execute(query))


def fire_until(rt: Runtime, dispatch: RecordingDispatch, count: int) -> None:
    fired = [0]

    def all_fired() -> bool:
        fired[0] += fire_round(rt, dispatch)
        return fired[0] >= count

    wait_for(all_fired, lambda: f"{count} timers to fire, {fired[0]} did", timeout=20)


@pytest.mark.parametrize("fast_path", [False, True])
def test_a_sleep_step_is_a_timer_row_set_with_the_record_and_fired_once(
    runtime: Runtime, database_url: str, tmp_path: Path, fast_path: bool
) -> None:
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, fast_path=fast_path
    )
    pipeline, dispatch = sleeping(seconds=0.5), RecordingDispatch()
    job_id = start(runtime, pipeline)
    before = datetime.now(UTC)

    outcome = run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    # No message for the sleep step, nothing held in memory: the wait is a row.
    assert (outcome, dispatch.sent) == (Outcome.SUCCEEDED, [])
    [row] = timer_rows(runtime.engine, job_id)
    assert (row.step, row.kind, row.state) == ("nap", "sleep", "pending")
    due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
    assert before + timedelta(seconds=0.5) <= due <= datetime.now(UTC) + timedelta(seconds=0.5)
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "nap")
    [sleeping_event] = [
        e for e in runtime.store.history(job.id).events if e.kind is EventKind.SLEEPING
    ]
    assert sleeping_event.detail == {"until": due.isoformat()}
    view = history_view(runtime.store.history(job.id))
    assert view["waiting"] == f"sleeping until {due.isoformat()}"
    steps: Any = view["steps"]
    assert [step["state"] for step in steps] == ["succeeded", "sleeping", "not_started"]
    assert fire_round(runtime, dispatch) == 0  # not due yet

    fire_until(runtime, dispatch, 1)

    assert dispatch.sent == [(pipeline.name, "second", job_id)]
    assert fire_round(runtime, dispatch) == 0
    [row] = timer_rows(runtime.engine, job_id)
    assert row.state == "fired"
    assert row.dispatched_at is not None
    second = pipeline.step("second")
    assert run_step(runtime, dispatch, pipeline, second, job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert job.state is JobState.SUCCEEDED
    woke = job.results["nap"]
    assert isinstance(woke, dict)
    assert datetime.fromisoformat(str(woke["fired_at"])) >= due
    view = history_view(runtime.store.history(job.id))
    assert view["waiting"] is None
    steps = view["steps"]
    assert steps[1]["state"] == "succeeded"
    timers_now = timers_view(runtime.timers)
    assert timers_now["fired_last_5m"] == 1
    assert isinstance(timers_now["lateness_max_seconds"], float)


def test_a_sleep_until_a_time_from_the_context(runtime: Runtime) -> None:
    pipeline, dispatch = sleeping(until="wake_at"), RecordingDispatch()
    wake_at = datetime.now(UTC) + timedelta(hours=3)
    job_id = start(runtime, pipeline, wake_at=wake_at.isoformat())

    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    [row] = timer_rows(runtime.engine, job_id)
    due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
    assert due == wake_at
    assert timers_view(runtime.timers) == {
        "waiting_jobs": 1,
        "pending_by_due": {
            "overdue": 0,
            "within_1m": 0,
            "within_1h": 0,
            "within_1d": 1,
            "later": 0,
        },
        "fired_last_5m": 0,
        "lateness_p50_seconds": None,
        "lateness_p99_seconds": None,
        "lateness_max_seconds": None,
        "over_cap": [],
    }


def test_the_counts_stop_at_their_cap_and_say_so(runtime: Runtime) -> None:
    """`status` reads no more than a cap of each count, however many timers are pending."""
    pipeline, dispatch = sleeping(seconds=1800), RecordingDispatch()
    job_ids = [start(runtime, pipeline) for _ in range(3)]
    run_steps(runtime, dispatch, pipeline, pipeline.step("first"), job_ids)  # type: ignore[arg-type]

    view = timers_view(runtime.timers, cap=2, waiting_cap=1)

    assert (view["waiting_jobs"], view["pending_by_due"]) == (
        1,
        {"overdue": 0, "within_1m": 0, "within_1h": 2, "within_1d": 0, "later": 0},
    )
    assert view["over_cap"] == ["pending_by_due.within_1h", "waiting_jobs"]
    console = Console(width=240, record=True, file=io.StringIO())
    console.print(status_table({**_EMPTY_STATUS, "timers": view}))
    text = console.export_text()
    assert re.search(r"jobs waiting on timers +│ 1\+", text), text
    assert "2+ within_1h" in text
    # Under the caps, exact
    assert timers_view(runtime.timers)["over_cap"] == []
    assert runtime.timers.stats().pending["within_1h"] == 3


_EMPTY_STATUS: dict[str, JSON] = {
    "queues": {},
    "jobs": {},
    "events": {},
    "oldest_pending_age_seconds": None,
    "dead_letters_open": 0,
    "steps": {},
    "maps": {},
    "signals": {"waiting_jobs": 0, "kept": 0},
    "limits": {},
}


def test_a_sleep_whose_time_is_not_a_time_dead_letters_the_job(runtime: Runtime) -> None:
    pipeline, dispatch = sleeping(until="wake_at"), RecordingDispatch()
    job_id = start(runtime, pipeline, wake_at="next tuesday")

    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step, job.results["first"]) == (
        JobState.DEAD_LETTERED,
        "nap",
        {"word": job.context["word"]},
    )
    assert timer_rows(runtime.engine, job_id) == []
    [letter] = DeadLetterStore(engine=runtime.engine).list()
    assert "not an ISO 8601 time" in letter.message


def test_cancelling_a_sleeping_job_cancels_its_timer(runtime: Runtime) -> None:
    pipeline, dispatch = sleeping(seconds=0.2), RecordingDispatch()
    job_id = start(runtime, pipeline)
    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    job = runtime.store.cancel(uuid.UUID(job_id), by="test")

    assert job.state is JobState.CANCELLED
    [row] = timer_rows(runtime.engine, job_id)
    assert row.state == TimerState.CANCELLED
    due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
    wait_for(lambda: datetime.now(UTC) > due + timedelta(seconds=0.1), "the due time", timeout=5)
    assert fire_round(runtime, dispatch) == 0
    assert dispatch.sent == []
    assert runtime.timers.stats().waiting_jobs == 0


def test_the_sweeper_leaves_a_sleeping_job_alone(runtime: Runtime) -> None:
    pipeline, dispatch = sleeping(seconds=3600), RecordingDispatch()
    job_id = start(runtime, pipeline)
    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    report = sweep(runtime, dispatch, stalled_after=0.0)

    assert (report.redriven, dispatch.sent) == (0, [])


def test_two_loops_racing_fire_each_timer_once(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    """Two timer loops, each with its own engine (its own connections), on the same due
    timers: every timer fires, and none twice."""
    pipeline, dispatch = sleeping(seconds=0.0), RecordingDispatch()
    count = 120
    job_ids = [start(runtime, pipeline) for _ in range(count)]
    outcomes = run_steps(runtime, dispatch, pipeline, pipeline.step("first"), job_ids)  # type: ignore[arg-type]
    assert set(outcomes) == {Outcome.SUCCEEDED}
    loops = [_own_runtime(database_url, tmp_path) for _ in range(2)]
    dispatches = [RecordingDispatch(), RecordingDispatch()]
    go = threading.Barrier(2)
    errors: list[BaseException] = []

    def loop(rt: Runtime, sends: RecordingDispatch) -> None:
        try:
            # Connected before the start: a loop still connecting (slow on a loaded box)
            # let the other fire every timer alone (CI: "both loops fired some").
            with rt.engine.connect():
                pass
            go.wait()
            for _ in range(200):
                # Small rounds, and a pause between them, so that the loops interleave.
                fire_round(rt, sends, limit=7)
                if len(dispatches[0].sent) + len(dispatches[1].sent) >= count:
                    return
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=pair) for pair in zip(loops, dispatches, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for rt in loops:
        rt.close()

    assert errors == []
    sent = [job for each in dispatches for (_, _, job) in each.sent]
    assert sorted(sent) == sorted(job_ids)  # each exactly once
    if runtime.engine.dialect.name == "postgresql":
        # (SQLite's one writer may let one loop take every round: nothing to race there.)
        assert all(each.sent for each in dispatches), "both loops fired some"
    with runtime.engine.connect() as conn:
        states = conn.execute(sa.select(timers.c.state, sa.func.count()).group_by(timers.c.state))
        assert dict(states.all()) == {"fired": count}


def test_a_round_fires_at_most_its_limit(runtime: Runtime) -> None:
    """On Postgres, an `IN (… LIMIT n FOR UPDATE SKIP LOCKED)` the planner ran once per row
    scanned fired every due timer in one round, whatever the limit."""
    pipeline, dispatch = sleeping(seconds=0.0), RecordingDispatch()
    job_ids = [start(runtime, pipeline) for _ in range(12)]
    run_steps(runtime, dispatch, pipeline, pipeline.step("first"), job_ids)  # type: ignore[arg-type]

    assert fire_round(runtime, dispatch, limit=5) == 5
    assert len(dispatch.sent) == 5
    with runtime.engine.connect() as conn:
        states = conn.execute(sa.select(timers.c.state, sa.func.count()).group_by(timers.c.state))
        assert dict(states.all()) == {"fired": 5, "pending": 7}


def test_a_round_fires_no_more_than_its_limit_whatever_the_plan(
    runtime: Runtime, database_url: str
) -> None:
    """With hash and merge joins off (a plan as bad estimates make one), the due timers'
    subquery could run again for each row updated, each run taking the next few: a round
    must still fire at most its limit."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("SQLite fires in one locked transaction; no plan to choose")
    pipeline, dispatch = sleeping(seconds=0.0), RecordingDispatch()
    job_ids = [start(runtime, pipeline) for _ in range(30)]
    run_steps(runtime, dispatch, pipeline, pipeline.step("first"), job_ids)  # type: ignore[arg-type]
    engine = create_engine(database_url)

    @sa.event.listens_for(engine, "connect")
    def _nested_loops_only(dbapi_connection: Any, _record: object) -> None:
        with dbapi_connection.cursor() as cursor:
            for kind in ("hashjoin", "hashagg", "mergejoin", "material"):
                cursor.execute(f"SET enable_{kind} = off")
        dbapi_connection.commit()

    try:
        fired = TimerLedger(engine=engine).fire_due(
            limit=5, pipelines=[pipeline.name], route=lambda _timer: "second"
        )
    finally:
        engine.dispose()

    assert len(fired) == 5


def _own_runtime(database_url: str, tmp_path: Path) -> Runtime:
    settings = settings_for(database_url=database_url, broker_url=None, data_dir=tmp_path)
    engine = create_engine(database_url)
    return Runtime(
        settings=settings,
        engine=engine,
        ledger=StepLedger(engine=engine, lease_seconds=30),
        store=JobStore(engine=engine),
        retry_policy=RetryPolicy(max_attempts=3, backoff_base=0.1, backoff_max=1.0),
    )


def test_a_loop_killed_after_firing_is_recovered_by_the_sweeper(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    """The loop commits the firing (the job moved on, the next step in the outbox) and is
    SIGKILLed before it publishes: the sweeper sends the step once `relay_after` passed."""
    dispatch = RecordingDispatch()
    job_id = start(runtime, toy_sleep)  # type: ignore[arg-type]
    step = toy_sleep.step("measure")
    assert run_step(runtime, dispatch, toy_sleep, step, job_id) is Outcome.SUCCEEDED  # type: ignore[arg-type]
    [row] = timer_rows(runtime.engine, job_id)
    due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
    wait_for(lambda: datetime.now(UTC) > due, "the timer's due time", timeout=5)

    died = subprocess.run(
        [sys.executable, "-c", _FIRE_ONCE],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO_ROOT),
            "DATABASE_URL": database_url,
            "ONCELERY_DATA_DIR": str(tmp_path / "loop"),
            "ONCELERY_PIPELINES": "tests.toy_pipeline",
            "ONCELERY_CRASH_POINTS": "cool_off:after_fire",
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert died.returncode == -9, died.stderr
    [row] = timer_rows(runtime.engine, job_id)
    assert (row.state, row.dispatched_at) == ("fired", None)
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "announce")
    assert fire_round(runtime, dispatch) == 0  # fired once: the claim holds
    runtime.settings = settings_for(
        database_url=database_url, broker_url=None, data_dir=tmp_path, relay_after=0.2
    )

    def resent() -> bool:
        sweep(runtime, dispatch, stalled_after=3600)
        return bool(dispatch.sent)

    wait_for(resent, "the sweeper to resend the step after the timer", timeout=10)
    assert (dispatch.sent, dispatch.resent) == ([("toy-sleep", "announce", job_id)], [job_id])
    sweep(runtime, dispatch, stalled_after=3600)
    assert len(dispatch.sent) == 1  # taken once


_FIRE_ONCE = """
from config import get_settings
from jobs.engine.runtime import Runtime, load_pipelines
from jobs.engine.timers import fire_round
from jobs.ops.history import history_view
from jobs.ops.status import status_table, timers_view
from tests.factories import RecordingDispatch

settings = get_settings()
load_pipelines(settings)
print(fire_round(Runtime.from_settings(settings), RecordingDispatch()))
"""


def test_a_job_adopting_another_jobs_result_before_a_sleep_sleeps_too(runtime: Runtime) -> None:
    """The same request as two events: the second job adopts the first one's result, and
    its timer is set in the transaction that moves it to the sleep step."""
    pipeline, dispatch = sleeping(seconds=3600), RecordingDispatch()
    word = uuid.uuid4().hex
    first, second = start(runtime, pipeline, word=word), start(runtime, pipeline, word=word)
    step = pipeline.step("first")

    run_step(runtime, dispatch, pipeline, step, first)  # type: ignore[arg-type]
    outcome = run_step(runtime, dispatch, pipeline, step, second)  # type: ignore[arg-type]

    assert (outcome, dispatch.sent) == (Outcome.DUPLICATE, [])
    for job_id in (first, second):
        [row] = timer_rows(runtime.engine, job_id)
        assert (row.step, row.state) == ("nap", "pending")
    assert runtime.timers.stats().waiting_jobs == 2


def test_a_read_only_step_before_a_sleep_is_claimed_and_sets_the_timer(runtime: Runtime) -> None:
    pipeline = Pipeline(
        name=f"sleeper-{next(_names)}",
        steps=[
            Step("first", _first, key="r:{word}:first", delivery=Delivery.READ_ONLY),
            Sleep("nap", seconds=3600),
            Step("second", _second, key="r:{word}:second"),
        ],
        resources=lambda _settings: None,
    )
    dispatch = RecordingDispatch()
    job_id = start(runtime, pipeline)

    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]

    assert dispatch.sent == []
    [row] = timer_rows(runtime.engine, job_id)
    assert row.state == "pending"


def test_a_pipeline_refuses_a_sleep_nothing_would_set() -> None:
    def steps(*names: str) -> list[Step[None]]:
        made: list[Step[None]] = []
        for name in names:
            if name.startswith("z"):
                made.append(Sleep(name, seconds=1))
            else:
                made.append(Step(name, _first, key=f"{name}:{{word}}"))
        return made

    for names, error in [
        (("z1", "a"), "cannot be the first step"),
        (("a", "z1", "z2", "b"), "follows another sleep"),
    ]:
        with pytest.raises(ValueError, match=error):
            Pipeline(name="refused", steps=steps(*names), resources=lambda _s: None)
    with pytest.raises(ValueError, match="give seconds or until"):
        Sleep("z", seconds=1, until="at")


def test_a_timer_whose_step_is_gone_dead_letters_its_job_and_the_others_fire(
    runtime: Runtime,
) -> None:
    """A pipeline redeclared without its sleep step: that job's timer cannot move it, and
    must not block the loop (left pending, it would be taken again every round)."""
    dispatch = RecordingDispatch()
    gone, kept = sleeping(seconds=0), sleeping(seconds=0)
    lost, fine = start(runtime, gone), start(runtime, kept)
    run_step(runtime, dispatch, gone, gone.step("first"), lost)  # type: ignore[arg-type]
    run_step(runtime, dispatch, kept, kept.step("first"), fine)  # type: ignore[arg-type]
    Pipeline(
        name=gone.name,
        steps=[Step("first", _first, key="s:{word}:first"), Step("second", _second, key="x")],
        resources=lambda _settings: None,
    )

    fire_until(runtime, dispatch, 1)

    assert dispatch.sent == [(kept.name, "second", fine)]
    assert runtime.store.get_job(uuid.UUID(lost)).state is JobState.DEAD_LETTERED
    [letter] = DeadLetterStore(engine=runtime.engine).list()
    assert (letter.step, letter.message) == ("nap", f"pipeline {gone.name!r} has no step 'nap'")
    assert {row.state for row in timer_rows(runtime.engine, lost)} == {"fired"}


def test_a_stray_message_of_a_sleep_step_is_absorbed_and_a_missing_timer_armed(
    runtime: Runtime,
) -> None:
    """An outbox resends the step its job was at when it published, by then perhaps a wait;
    a person's `dlq resolve` of the step before moves the job to the wait with no timer and
    sends it. Neither message may dead-letter the job (no worker runs a wait)."""
    pipeline, dispatch = sleeping(seconds=0.2), RecordingDispatch()
    job_id = start(runtime, pipeline)
    run_step(runtime, dispatch, pipeline, pipeline.step("first"), job_id)  # type: ignore[arg-type]
    nap = pipeline.step("nap")

    # A stray copy while the job sleeps: absorbed, the timer left as it is
    assert run_step(runtime, dispatch, pipeline, nap, job_id) is Outcome.DUPLICATE  # type: ignore[arg-type]
    [row] = timer_rows(runtime.engine, job_id)
    assert row.state == "pending"
    job = runtime.store.get_job(uuid.UUID(job_id))
    assert (job.state, job.current_step) == (JobState.RUNNING, "nap")

    # The job at its sleep with no timer (as a resolve leaves it): the message arms one
    with runtime.engine.begin() as conn:
        conn.execute(sa.delete(timers).where(timers.c.job_id == uuid.UUID(job_id)))
    assert run_step(runtime, dispatch, pipeline, nap, job_id) is Outcome.DUPLICATE  # type: ignore[arg-type]
    [row] = timer_rows(runtime.engine, job_id)
    assert row.state == "pending"
    fire_until(runtime, dispatch, 1)
    assert dispatch.sent == [(pipeline.name, "second", job_id)]

    # Once the job moved on, a late copy changes nothing
    assert run_step(runtime, dispatch, pipeline, nap, job_id) is Outcome.INACTIVE  # type: ignore[arg-type]
    assert [row.state for row in timer_rows(runtime.engine, job_id)] == ["fired"]
    assert runtime.store.get_job(uuid.UUID(job_id)).state is JobState.RUNNING
    assert DeadLetterStore(engine=runtime.engine).list(job_id=uuid.UUID(job_id)) == []
