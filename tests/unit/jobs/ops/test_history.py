"""`jobs.ops.history.history_view`: a job's state and each step's state, attempts, input, output,
error and duration, as `oncelery history --json` prints them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config import Settings
from jobs.ops.history import history_view
from jobs.pipelines import Pipeline, Step, StepContext
from ledger import (
    JSON,
    AlreadySucceeded,
    Claim,
    EventKind,
    Failure,
    Job,
    JobHistory,
    JobState,
    JobStore,
    StepEntry,
    StepEvent,
    StepLedger,
    StepState,
    create_engine,
    upgrade,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_JOB_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")
CONTEXT: dict[str, JSON] = {"order_id": "o1", "customer_id": "c1"}
KEYS = {"gather": "order:o1:gather", "act": "order:o1:charge", "publish": "order:o1:notify"}
TRANSIENT: JSON = {"type": "TransientError", "message": "POST /payments/charges answered 503"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_job(
    *,
    state: JobState = JobState.RUNNING,
    results: dict[str, JSON] | None = None,
    current_step: str | None = "publish",
    pipeline: str = "unit-history-unregistered",
) -> Job:
    return Job(
        id=JOB_ID,
        pipeline=pipeline,
        event_id="evt-1",
        state=state,
        context=CONTEXT,
        fingerprint="f" * 64,
        step_keys=KEYS,
        results=results or {},
        current_step=current_step,
        created_at=T0,
        updated_at=at(10),
        finished_at=None,
    )


def make_entry(
    step: str, state: StepState, attempts: int, *, job_id: uuid.UUID = JOB_ID, error: JSON = None
) -> StepEntry:
    return StepEntry(
        key=KEYS[step],
        job_id=job_id,
        step=step,
        state=state,
        fingerprint="f" * 64,
        attempts=attempts,
        result=None,
        error=error,
        locked_until=None,
        started_at=at(1),
        finished_at=at(2),
    )


def make_event(
    number: int,
    step: str,
    kind: EventKind,
    *,
    attempt: int | None,
    duration_ms: float | None = None,
    detail: JSON = None,
) -> StepEvent:
    return StepEvent(
        id=number,
        job_id=JOB_ID,
        step=step,
        key=KEYS[step],
        attempt=attempt,
        kind=kind,
        at=at(number),
        duration_ms=duration_ms,
        detail=detail,
    )


@pytest.fixture
def history() -> JobHistory:
    """A job whose gather was adopted from another job, whose act succeeded on its second
    attempt, and whose publish has not started."""
    gathered: JSON = {"customer": {"id": "c1"}, "total": 700}
    charged: JSON = {"charge_id": "ch_1"}
    retrying: JSON = {"error": TRANSIENT, "retry_in": 0.25}
    return JobHistory(
        job=make_job(results={"gather": gathered, "act": charged}),
        entries=(
            make_entry("gather", StepState.SUCCEEDED, 1, job_id=OTHER_JOB_ID),
            make_entry("act", StepState.SUCCEEDED, 2),
        ),
        events=(
            make_event(1, "gather", EventKind.DEDUPLICATED, attempt=None, detail=gathered),
            make_event(2, "act", EventKind.FAILED, attempt=1, duration_ms=3.0, detail=retrying),
            make_event(
                3, "act", EventKind.SUCCEEDED, attempt=2, duration_ms=7.1234, detail=charged
            ),
        ),
    )


def _steps(view: dict[str, JSON]) -> dict[str, dict[str, JSON]]:
    steps = view["steps"]
    assert isinstance(steps, list)
    by_name: dict[str, dict[str, JSON]] = {}
    for step in steps:
        assert isinstance(step, dict)
        by_name[str(step["name"])] = step
    return by_name


def test_the_job_part(history: JobHistory) -> None:
    view = history_view(history)

    assert {key: value for key, value in view.items() if key != "steps"} == {
        "job_id": str(JOB_ID),
        "pipeline": "unit-history-unregistered",
        "event_id": "evt-1",
        "state": "running",
        "current_step": "publish",
        "created_at": "2026-03-01T12:00:00+00:00",
        "updated_at": "2026-03-01T12:00:10+00:00",
        "finished_at": None,
        "waiting": None,
        "results": {
            "gather": {"customer": {"id": "c1"}, "total": 700},
            "act": {"charge_id": "ch_1"},
        },
    }


def test_an_adopted_step_is_succeeded_and_deduplicated(history: JobHistory) -> None:
    gather = _steps(history_view(history))["gather"]

    assert gather == {
        "name": "gather",
        "key": "order:o1:gather",
        "state": "succeeded",
        "deduplicated": True,
        "attempts": 0,
        "input": {"context": CONTEXT, "results": {}},
        "output": {"customer": {"id": "c1"}, "total": 700},
        "error": None,
        "errors": 0,
        "duration": None,
        "started_at": "2026-03-01T12:00:01+00:00",
        "finished_at": "2026-03-01T12:00:02+00:00",
        "events": [
            {
                "kind": "deduplicated",
                "attempt": None,
                "at": "2026-03-01T12:00:01+00:00",
                "duration_ms": None,
                "detail": {"customer": {"id": "c1"}, "total": 700},
            }
        ],
        "waiting": None,
    }


def test_a_retried_step_counts_its_attempts_and_failures(history: JobHistory) -> None:
    act = _steps(history_view(history))["act"]

    assert act["state"] == "succeeded"
    assert act["deduplicated"] is False
    assert act["attempts"] == 2
    assert act["input"] == {
        "context": CONTEXT,
        "results": {"gather": {"customer": {"id": "c1"}, "total": 700}},
    }
    assert act["output"] == {"charge_id": "ch_1"}
    assert act["error"] is None  # it succeeded in the end
    assert act["errors"] == 1
    assert act["duration"] == 0.007123  # the successful attempt's, in seconds
    assert act["events"] == [
        {
            "kind": "failed",
            "attempt": 1,
            "at": "2026-03-01T12:00:02+00:00",
            "duration_ms": 3.0,
            "detail": {"error": TRANSIENT, "retry_in": 0.25},
        },
        {
            "kind": "succeeded",
            "attempt": 2,
            "at": "2026-03-01T12:00:03+00:00",
            "duration_ms": 7.123,
            "detail": {"charge_id": "ch_1"},
        },
    ]


def test_a_step_not_started(history: JobHistory) -> None:
    publish = _steps(history_view(history))["publish"]

    assert publish == {
        "name": "publish",
        "key": "order:o1:notify",
        "state": "not_started",
        "deduplicated": False,
        "attempts": 0,
        "input": {
            "context": CONTEXT,
            "results": {
                "gather": {"customer": {"id": "c1"}, "total": 700},
                "act": {"charge_id": "ch_1"},
            },
        },
        "output": None,
        "error": None,
        "errors": 0,
        "duration": None,
        "started_at": None,
        "finished_at": None,
        "events": [],
        "waiting": None,
    }


def test_the_view_is_json(history: JobHistory) -> None:
    view = history_view(history)

    assert json.loads(json.dumps(view)) == view


def test_a_dead_lettered_step_shows_its_last_error() -> None:
    final: JSON = {"type": "PermanentError", "message": "answered 402 (card_declined)"}
    history = JobHistory(
        job=make_job(state=JobState.DEAD_LETTERED, current_step="act"),
        entries=(
            make_entry("gather", StepState.SUCCEEDED, 1),
            make_entry("act", StepState.FAILED, 2),
        ),
        events=(
            make_event(1, "gather", EventKind.SUCCEEDED, attempt=1, duration_ms=1.0),
            make_event(2, "act", EventKind.FAILED, attempt=1, detail={"error": TRANSIENT}),
            make_event(3, "act", EventKind.DEAD_LETTERED, attempt=2, detail={"error": final}),
        ),
    )

    view = history_view(history)

    act = _steps(view)["act"]
    assert view["state"] == "dead_lettered"
    assert (act["state"], act["attempts"], act["errors"]) == ("failed", 2, 2)
    assert act["error"] == final
    assert (act["output"], act["duration"]) == (None, None)


def test_a_step_waiting_for_its_retry_shows_the_error_so_far() -> None:
    history = JobHistory(
        job=make_job(current_step="gather"),
        entries=(make_entry("gather", StepState.FAILED, 1),),
        events=(make_event(1, "gather", EventKind.FAILED, attempt=1, detail={"error": TRANSIENT}),),
    )

    gather = _steps(history_view(history))["gather"]

    assert (gather["state"], gather["attempts"], gather["error"]) == ("failed", 1, TRANSIENT)


def test_an_unknown_outcome_is_shown_as_unknown() -> None:
    lost: JSON = {
        "type": "OutcomeUnknown",
        "message": "owner vanished between acting and recording",
    }
    history = JobHistory(
        job=make_job(state=JobState.DEAD_LETTERED, current_step="gather"),
        entries=(make_entry("gather", StepState.UNKNOWN, 1),),
        events=(
            make_event(1, "gather", EventKind.DEAD_LETTERED, attempt=1, detail={"error": lost}),
        ),
    )

    gather = _steps(history_view(history))["gather"]

    assert (gather["state"], gather["error"]) == ("unknown", lost)


def _noop(ctx: StepContext[None]) -> JSON:
    return ctx.step


def _no_resources(_settings: Settings) -> None:
    return None


def test_steps_follow_the_declared_pipeline_order() -> None:
    name = f"unit-{uuid.uuid4().hex[:10]}"
    Pipeline(
        name=name,
        steps=[Step(step, _noop, key=f"x:{step}") for step in ("publish", "act", "gather")],
        resources=_no_resources,
    )

    view = history_view(JobHistory(job=make_job(pipeline=name), entries=(), events=()))

    assert [step["name"] for step in _steps(view).values()] == ["publish", "act", "gather"]


def test_an_undeclared_pipeline_keeps_the_plan_order(history: JobHistory) -> None:
    assert list(_steps(history_view(history))) == ["gather", "act", "publish"]


def test_each_step_has_the_contract_fields(history: JobHistory) -> None:
    for step in _steps(history_view(history)).values():
        assert {"name", "state", "attempts", "input", "output", "error", "duration"} <= set(step)


# --- the same, through a real SQLite ledger -------------------------------------------------


def test_history_of_a_job_run_through_a_sqlite_ledger(tmp_path: Path) -> None:
    # Given two jobs for the same request, each planned with the same three keys,
    name = f"unit-{uuid.uuid4().hex[:10]}"
    pipeline = Pipeline(
        name=name,
        steps=[Step(step, _noop, key=f"word:{{word}}:{step}") for step in ("a", "b", "c")],
        resources=_no_resources,
    )
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    upgrade(engine)
    store = JobStore(engine=engine)
    ledger = StepLedger(engine=engine, lease_seconds=60)
    [(first, _), (second, _)] = store.create_jobs(
        [pipeline.new_job("evt-1", {"word": "hi"}), pipeline.new_job("evt-2", {"word": "hi"})]
    )
    # the first job records step a,
    claim = ledger.claim_step(first, "a")
    assert isinstance(claim, Claim)
    ledger.record_success(claim, {"n": 1}, next_step="b", duration_ms=12.5)
    # the second adopts a's result, fails b once, then succeeds, and never starts c.
    adopted = ledger.claim_step(second, "a")
    assert isinstance(adopted, AlreadySucceeded)
    ledger.adopt_result(adopted, next_step="b")
    claim = ledger.claim_step(second, "b")
    assert isinstance(claim, Claim)
    ledger.record_failure(claim, Failure(error=TRANSIENT, retry_in=0.0, duration_ms=3.0))
    claim = ledger.claim_step(second, "b")
    assert isinstance(claim, Claim)
    ledger.record_success(claim, {"n": 2}, next_step="c", duration_ms=7.25)

    # When the second job's history is viewed,
    view = history_view(store.history(second))
    engine.dispose()

    # Then each step says what happened to it.
    steps = _steps(view)
    assert (view["state"], view["current_step"], view["event_id"]) == ("running", "c", "evt-2")
    summary = {
        step: (s["state"], s["deduplicated"], s["attempts"], s["output"], s["errors"])
        for step, s in steps.items()
    }
    assert summary == {
        "a": ("succeeded", True, 0, {"n": 1}, 0),
        "b": ("succeeded", False, 2, {"n": 2}, 1),
        "c": ("not_started", False, 0, None, 0),
    }
    assert (steps["b"]["duration"], steps["b"]["error"]) == (0.00725, None)
    assert steps["b"]["input"] == {"context": {"word": "hi"}, "results": {"a": {"n": 1}}}
    events = steps["b"]["events"]
    assert isinstance(events, list)
    assert [(e["kind"], e["attempt"]) for e in events if isinstance(e, dict)] == [
        ("failed", 1),
        ("succeeded", 2),
    ]
    assert json.loads(json.dumps(view)) == view
