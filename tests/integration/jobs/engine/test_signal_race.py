"""Signal and timeout at the same instant, many times, on the real ledger (Postgres and
SQLite): 200 jobs wait with their timeouts all due; round after round one thread's timer loop
fires the earliest while another thread, on its own connections, signals that same job at the
same instant (three turns in four).
Each job runs exactly one branch, each time: one wait result, one history event, its timer
fired or ended by the signal, the signal taken by it or kept, its next step published once by
the side that won."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from jobs.engine.run import Outcome, run_steps
from jobs.engine.runtime import Runtime
from jobs.engine.signals import send_signal
from jobs.engine.timers import fire_round
from jobs.pipelines import Pipeline, Step, StepContext
from jobs.retry import RetryPolicy
from jobs.waits import WaitForSignal
from ledger import (
    JSON,
    EventKind,
    JobStore,
    NewSignal,
    SignalOutcome,
    SignalSent,
    StepLedger,
    create_engine,
)
from ledger.schema import signals, timers
from tests.conftest import settings_for
from tests.factories import RecordingDispatch

JOBS = 200
#: Races per test; more with `TEST_SIGNAL_RACE_ROUNDS` (CI runs one per database).
ROUNDS = int(os.environ.get("TEST_SIGNAL_RACE_ROUNDS", "1"))
_names = iter(range(10**6))


def _first(ctx: StepContext[None]) -> JSON:
    return {"word": ctx.context["word"]}


def _second(ctx: StepContext[None]) -> JSON:
    return {"after": ctx.results["wait"]}


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


def test_signal_and_timeout_racing_run_exactly_one_branch_per_job(
    runtime: Runtime, database_url: str, tmp_path: Path
) -> None:
    branches: Counter[str] = Counter()
    for _ in range(ROUNDS):
        branches += race(runtime, database_url, tmp_path)
    # The figures, for the record (`pytest -s`).
    print(f"\n{runtime.engine.dialect.name}, {ROUNDS} x {JOBS} jobs: {dict(branches)}")
    if runtime.engine.dialect.name == "postgresql":
        # Both sides won some, or nothing raced. (SQLite's one writer may let either side
        # take every turn: its transactions never overlap.)
        assert branches["signal"] > 0
        assert branches["timeout_after_signal"] > 0


def race(runtime: Runtime, database_url: str, tmp_path: Path) -> Counter[str]:
    """One race of `JOBS` jobs; how each one's wait ended."""
    pipeline: Pipeline[None] = Pipeline(
        name=f"race-{next(_names)}",
        steps=[
            Step("first", _first, key="race:{word}:first"),
            WaitForSignal("wait", signal="shipped", key="{word}", timeout=0.0),
            Step("second", _second, key="race:{word}:second"),
        ],
        resources=lambda _settings: None,
    )
    words = {}
    for _ in range(JOBS):
        word = uuid.uuid4().hex
        new = pipeline.new_job(f"evt-{word}", {"word": word})
        [(job_id, _)] = runtime.store.create_jobs([new])
        words[str(job_id)] = word
    job_ids = list(words)
    first = pipeline.step("first")
    outcomes = run_steps(runtime, RecordingDispatch(), pipeline, first, job_ids)  # type: ignore[arg-type]
    assert set(outcomes) == {Outcome.SUCCEEDED}
    # Every job waits, its timeout already due. Turn after turn, the timer loop fires the
    # earliest due timer while, at the same instant, the other thread signals that job (but
    # every fourth turn, when it lets it time out).
    loop_rt, signal_rt = _own_runtime(database_url, tmp_path), _own_runtime(database_url, tmp_path)
    fired, sent_by_signal = RecordingDispatch(), RecordingDispatch()
    sent: dict[str, SignalSent] = {}
    go, errors, done = threading.Barrier(2, timeout=60), [], threading.Event()

    def loop() -> None:
        try:
            while True:
                go.wait()
                if done.is_set():
                    return
                # A few milliseconds either way: the signal's statements get there first,
                # or the loop's, or they meet on the timer's row.
                time.sleep(random.uniform(0, 0.004))
                fire_round(loop_rt, fired, limit=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            go.abort()

    def signal_each() -> None:
        try:
            for turn in range(JOBS * 2):
                target = earliest_waiting(signal_rt, job_ids)
                if target is None:
                    break
                go.wait()
                if turn % 4 != 3:
                    signal = NewSignal("shipped", words[target], f"sig-{target}", {"job": target})
                    sent[target] = send_signal(signal_rt, sent_by_signal, signal)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                go.wait()

    threads = [threading.Thread(target=loop), threading.Thread(target=signal_each)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    loop_rt.close()
    signal_rt.close()
    assert errors == []
    assert pending(runtime, job_ids) == 0
    return check(runtime, pipeline.name, words, list(sent), sent, fired, sent_by_signal)


def earliest_waiting(rt: Runtime, job_ids: list[str]) -> str | None:
    """The job whose timer the loop fires next."""
    with rt.engine.connect() as conn:
        query = (
            sa.select(timers.c.job_id)
            .where(
                timers.c.state == "pending", timers.c.job_id.in_([uuid.UUID(j) for j in job_ids])
            )
            .order_by(timers.c.due_at)
            .limit(1)
        )
        found = conn.execute(query).scalar_one_or_none()
    return str(found) if found is not None else None


def pending(rt: Runtime, job_ids: list[str]) -> int:
    with rt.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(
            timers.c.state == "pending", timers.c.job_id.in_([uuid.UUID(j) for j in job_ids])
        )
        return int(conn.execute(query).scalar_one())


def check(
    rt: Runtime,
    pipeline: str,
    words: dict[str, str],
    signalled: list[str],
    sent: dict[str, SignalSent],
    fired: RecordingDispatch,
    sent_by_signal: RecordingDispatch,
) -> Counter[str]:
    """Exactly one branch per job; returns how each wait ended."""
    ids = [uuid.UUID(job_id) for job_id in words]
    with rt.engine.connect() as conn:
        timer_states = {
            str(row.job_id): row.state
            for row in conn.execute(sa.select(timers).where(timers.c.job_id.in_(ids)))
        }
        keys = [f"sig-{job_id}" for job_id in signalled]
        taken = {
            row.signal_id: (str(row.job_id) if row.job_id else None, row.consumed_at)
            for row in conn.execute(sa.select(signals).where(signals.c.signal_id.in_(keys)))
        }
    assert {each.outcome for each in sent.values()} <= {SignalOutcome.RECORDED}
    assert len(sent) == len(signalled)
    by_loop = [job for _, step, job in fired.sent if step == "second"]
    by_signal = [job for _, step, job in sent_by_signal.sent if step == "second"]
    # Published exactly once per job, all told, by one side or the other.
    assert sorted(by_loop + by_signal) == sorted(words)
    branches: Counter[str] = Counter()
    for job_id in words:
        job = rt.store.get_job(uuid.UUID(job_id))
        result: Any = job.results["wait"]
        events = [event.kind for event in rt.store.history(job.id).events]
        ends = [kind for kind in events if kind in (EventKind.SIGNALLED, EventKind.TIMED_OUT)]
        assert job.current_step == "second", job_id
        if result["by"] == "signal":
            assert ends == [EventKind.SIGNALLED], job_id
            assert timer_states[job_id] == "cancelled", job_id
            assert result["signal_id"] == f"sig-{job_id}"
            assert result["data"] == {"job": job_id}
            assert taken[f"sig-{job_id}"][0] == job_id
            woke = sent[job_id].woke
            assert woke is not None
            assert str(woke.job_id) == job_id
            assert job_id in by_signal
            assert job_id not in by_loop
            branches["signal"] += 1
            continue
        assert result["by"] == "timeout", job_id
        assert ends == [EventKind.TIMED_OUT], job_id
        assert timer_states[job_id] == "fired", job_id
        assert job_id in by_loop
        assert job_id not in by_signal
        if job_id in sent:
            # The signal lost: it changed nothing and is kept, unconsumed.
            assert sent[job_id].woke is None
            assert taken[f"sig-{job_id}"] == (None, None)
            branches["timeout_after_signal"] += 1
        else:
            branches["timeout"] += 1
    assert pipeline  # (the jobs' pipeline, named in failures above by job id)
    return branches
