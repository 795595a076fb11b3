"""A job's history as people and scripts read it: its state, then each step with its state,
attempts, input, output, error, duration and events."""

from __future__ import annotations

from datetime import datetime

from jobs.errors import UnknownPipeline
from jobs.pipelines import registry
from ledger import JSON, EventKind, Job, JobHistory, StepEntry, StepEvent


def history_view(history: JobHistory) -> dict[str, JSON]:
    """The JSON object `oncelery history --json` prints."""
    job = history.job
    entries = {entry.key: entry for entry in history.entries}
    maps = {counters.step: counters for counters in history.maps}
    steps: list[JSON] = []
    earlier: dict[str, JSON] = {}
    for name in _step_order(history):
        events = [event for event in history.events if event.step == name]
        entry = entries.get(job.step_keys[name])
        view = _step_view(job, name, entry, events, dict(earlier))
        if name in maps and isinstance(view, dict):
            # A map step's items, summed up: a map may have 100,000 of them.
            view["items"] = maps[name].summary()
        steps.append(view)
        if name in job.results:
            earlier[name] = job.results[name]
    return {
        "job_id": str(job.id),
        "pipeline": job.pipeline,
        "event_id": job.event_id,
        "state": str(job.state),
        "current_step": job.current_step,
        "created_at": _time(job.created_at),
        "updated_at": _time(job.updated_at),
        "finished_at": _time(job.finished_at),
        # What the job waits for, while it does ("sleeping until <time>", "waiting for
        # signal <name> (key <key>) until <time>", "retrying at <time>"), else None.
        "waiting": next(
            (step["waiting"] for step in steps if isinstance(step, dict) and step["waiting"]),
            None,
        ),
        # What each step returned, by step name (`jobs.wait`'s callers read it here).
        "results": dict(job.results),
        "steps": steps,
    }


def _step_order(history: JobHistory) -> list[str]:
    planned = list(history.job.step_keys)
    try:
        declared = [step.name for step in registry.get(history.job.pipeline).steps]
    except UnknownPipeline:
        # A pipeline this process did not load: the plan's own order is still meaningful.
        return planned
    # The job's plan is the truth (the pipeline may have changed since it was created); the
    # declaration only orders it.
    return [name for name in declared if name in planned] + [
        name for name in planned if name not in declared
    ]


def _step_view(
    job: Job, name: str, entry: StepEntry | None, events: list[StepEvent], earlier: dict[str, JSON]
) -> JSON:
    adopted = any(event.kind is EventKind.DEDUPLICATED for event in events)
    state = "not_started" if entry is None else str(entry.state)
    if adopted:
        state = "succeeded"
    waiting = _waiting(job, name, events)
    if waiting is not None:
        state = (
            "sleeping"
            if waiting.startswith("sleeping")
            else "retrying"
            if waiting.startswith("retrying")
            else "waiting"
        )
    elif any(event.kind in _WAIT_ENDS for event in events):
        state = "succeeded"
    else:
        waiting = _limited(job, name, entry, events)
    errors = [
        event.detail
        for event in events
        if event.kind in (EventKind.FAILED, EventKind.DEAD_LETTERED)
    ]
    last_error = errors[-1].get("error") if errors and isinstance(errors[-1], dict) else None
    durations = [event.duration_ms for event in events if event.kind is EventKind.SUCCEEDED]
    return {
        "name": name,
        "key": job.step_keys[name],
        "state": state,
        "deduplicated": adopted,
        "attempts": entry.attempts if entry is not None and not adopted else 0,
        "input": {"context": dict(job.context), "results": earlier},
        "output": job.results.get(name),
        "error": last_error if state != "succeeded" else None,
        "errors": len(errors),
        # Seconds the successful attempt took (each event keeps its own `duration_ms`).
        "duration": round(durations[-1] / 1000, 6)
        if durations and durations[-1] is not None
        else None,
        "started_at": _time(entry.started_at) if entry else None,
        "finished_at": _time(entry.finished_at) if entry else None,
        "events": [_event_view(event) for event in events],
        # What the step waits for, while it does: "sleeping until <time>", "waiting for
        # signal <name> (key <key>) until <time>", "retrying at <time>", or "waiting for
        # limit `customer:42`".
        "waiting": waiting,
    }


#: Events that end a wait step's wait.
_WAIT_ENDS = (EventKind.WOKE, EventKind.SIGNALLED, EventKind.TIMED_OUT)


def _waiting(job: Job, name: str, events: list[StepEvent]) -> str | None:
    """What the job waits for at step `name` while it does: "sleeping until <time>" or
    "waiting for signal <name> (key <key>) until <time>" (its wait not ended), "retrying
    at <time>" while a failed attempt of it waits for its retry timer."""
    if job.current_step != name or str(job.state) not in ("pending", "running") or not events:
        return None
    last = events[-1]
    detail = last.detail if isinstance(last.detail, dict) else {}
    if last.kind is EventKind.FAILED and "retry_at" in detail:
        return f"retrying at {detail['retry_at']}"
    if {event.kind for event in events}.intersection(_WAIT_ENDS):
        return None
    began = [event for event in events if event.kind in (EventKind.SLEEPING, EventKind.WAITING)]
    if not began:
        return None
    detail = began[-1].detail if isinstance(began[-1].detail, dict) else {}
    if began[-1].kind is EventKind.SLEEPING:
        return f"sleeping until {detail.get('until')}"
    return (
        f"waiting for signal {detail.get('signal')} (key {detail.get('key')}) "
        f"until {detail.get('until')}"
    )


def _limited(job: Job, name: str, entry: StepEntry | None, events: list[StepEvent]) -> str | None:
    """ "waiting for limit `<key>`" while the job waits at step `name` for its limit: its
    last event says so, and no claim was made since."""
    if job.current_step != name or str(job.state) not in ("pending", "running"):
        return None
    if not events or events[-1].kind is not EventKind.LIMITED:
        return None
    last = events[-1]
    if entry is not None and entry.started_at is not None and entry.started_at > last.at:
        return None
    limit = last.detail.get("limit") if isinstance(last.detail, dict) else None
    return f"waiting for limit `{limit}`"


def _event_view(event: StepEvent) -> JSON:
    return {
        "kind": str(event.kind),
        "attempt": event.attempt,
        "at": _time(event.at),
        "duration_ms": round(event.duration_ms, 3) if event.duration_ms is not None else None,
        "detail": event.detail,
    }


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
