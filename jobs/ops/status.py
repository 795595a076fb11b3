"""`oncelery status`: queue depths, jobs by state, the oldest pending job, step durations over a
recent window, dead letters, map steps in progress, timers — one JSON object, or a table that
`--watch` refreshes."""

from __future__ import annotations

from celery import Celery
from rich.table import Table

from jobs.worker.queues import queue_depths
from ledger import (
    COUNT_CAP,
    JSON,
    WAITING_CAP,
    LedgerStats,
    LimitLedger,
    SignalLedger,
    TimerLedger,
)
from ledger.limits import LIMIT_WAITING_CAP
from ledger.map_views import MapViews
from ledger.signals import KEEP_FOR


def status_view(
    stats: LedgerStats, app: Celery, *, window: float, signal_keep_for: float = KEEP_FOR
) -> dict[str, JSON]:
    """Everything `status --json` prints (kept signals: those within `signal_keep_for`)."""
    snapshot = stats.snapshot(window=window)
    return {
        "queues": dict(queue_depths(app)),
        "jobs": {str(state): count for state, count in snapshot.jobs.items()},
        "oldest_pending_age_seconds": (
            round(snapshot.oldest_pending_age, 3)
            if snapshot.oldest_pending_age is not None
            else None
        ),
        "dead_letters_open": snapshot.open_dead_letters,
        "succeeded_estimated": snapshot.succeeded_estimated,
        "window_seconds": window,
        "steps": {
            timing.step: {
                "attempts": timing.attempts,
                "p50_ms": _round(timing.p50_ms),
                "p99_ms": _round(timing.p99_ms),
            }
            for timing in snapshot.steps
        },
        "events": {str(kind): count for kind, count in snapshot.events.items()},
        "maps": maps_in_progress(MapViews(engine=stats.engine)),
        "timers": timers_view(TimerLedger(engine=stats.engine)),
        "signals": signals_view(SignalLedger(engine=stats.engine, keep_for=signal_keep_for)),
        "limits": limits_view(LimitLedger(engine=stats.engine)),
    }


def limits_view(limits: LimitLedger) -> dict[str, JSON]:
    """Per limit key used or waited for lately (the busiest 50): its kind, slots held or
    tokens granted in the last second (`in_use`), runs waiting, waits set per second over
    the last minute, and the totals."""
    return {
        found.key: {
            "kind": str(found.kind),
            "in_use": found.in_use,
            "waiting": min(found.waiting, LIMIT_WAITING_CAP),
            "waiting_over_cap": found.waiting > LIMIT_WAITING_CAP,
            "throttled_per_second": found.throttled_per_second,
            "granted_total": found.granted_total,
            "throttled_total": found.throttled_total,
        }
        for found in limits.stats()
    }


def signals_view(signals: SignalLedger) -> dict[str, JSON]:
    """Jobs waiting for a signal (each also counts among the jobs waiting on timers: its
    timeout), and signals kept for a wait that has not come yet (not expired)."""
    kept, waiting = signals.counts()
    return {"waiting_jobs": waiting, "kept": kept}


def timers_view(
    timers: TimerLedger, *, cap: int = COUNT_CAP, waiting_cap: int = WAITING_CAP
) -> dict[str, JSON]:
    """Jobs waiting on timers, pending timers by due time, and how late the timers fired in
    the last five minutes were (due → fired, seconds). A count stops at its cap
    (`TimerLedger.stats`): `over_cap` names those that did (there are more)."""
    found = timers.stats(cap=cap, waiting_cap=waiting_cap)
    names = {"waiting_jobs": "waiting_jobs", "fired": "fired_last_5m"}
    over: list[JSON] = [*sorted(names.get(n, f"pending_by_due.{n}") for n in found.over_cap)]
    return {
        "waiting_jobs": found.waiting_jobs,
        "pending_by_due": dict(found.pending),
        "fired_last_5m": found.fired,
        "lateness_p50_seconds": _round(found.late_p50),
        "lateness_p99_seconds": _round(found.late_p99),
        "lateness_max_seconds": _round(found.late_max),
        "over_cap": over,
    }


def maps_in_progress(views: MapViews) -> dict[str, JSON]:
    """Per `pipeline.step`, the maps not joined yet and their items: read from the maps'
    counters (a row per map), never by counting items."""
    return {f"{found.pipeline}.{found.step}": found.summary() for found in views.in_progress()}


def status_table(view: dict[str, JSON]) -> Table:
    """The view as one table, for people."""
    table = Table("what", "value", title="oncelery status")
    for section in ("queues", "jobs", "events"):
        values = view[section]
        assert isinstance(values, dict)
        for name, count in values.items():
            table.add_row(f"{section}: {name}", "?" if count is None else str(count))
    table.add_row("oldest pending job", _age(view["oldest_pending_age_seconds"]))
    table.add_row("open dead letters", str(view["dead_letters_open"]))
    steps = view["steps"]
    assert isinstance(steps, dict)
    for step, timing in steps.items():
        assert isinstance(timing, dict)
        summary = f"p50 {timing['p50_ms']} ms · p99 {timing['p99_ms']} ms"
        table.add_row(f"step {step}", f"{summary} · {timing['attempts']} attempts")
    maps = view["maps"]
    assert isinstance(maps, dict)
    for step, items in maps.items():
        assert isinstance(items, dict)
        table.add_row(f"map {step}", _map_line(items))
    timers = view["timers"]
    assert isinstance(timers, dict)
    pending, over = timers["pending_by_due"], timers["over_cap"]
    assert isinstance(pending, dict)
    assert isinstance(over, list)

    def shown(name: str, value: JSON) -> str:
        return f"{value}+" if name in over else str(value)

    table.add_row("jobs waiting on timers", shown("waiting_jobs", timers["waiting_jobs"]))
    table.add_row(
        "timers pending",
        " · ".join(f"{shown(f'pending_by_due.{due}', n)} {due}" for due, n in pending.items()),
    )
    signals = view["signals"]
    assert isinstance(signals, dict)
    table.add_row("jobs waiting for signals", str(signals["waiting_jobs"]))
    table.add_row("signals kept (no wait yet)", str(signals["kept"]))
    limits = view["limits"]
    assert isinstance(limits, dict)
    for key, limit in limits.items():
        assert isinstance(limit, dict)
        table.add_row(
            f"limit {key}",
            f"{limit['in_use']} in use · {limit['waiting']}"
            f"{'+' if limit.get('waiting_over_cap') else ''} waiting · "
            f"{limit['throttled_per_second']}/s throttled ({limit['kind']})",
        )
    table.add_row(
        "timer lateness (5 min)",
        f"{shown('fired_last_5m', timers['fired_last_5m'])} fired · "
        f"p50 {timers['lateness_p50_seconds']} s · p99 {timers['lateness_p99_seconds']} s · "
        f"max {timers['lateness_max_seconds']} s",
    )
    return table


def _map_line(items: dict[str, JSON]) -> str:
    running = items["maps"]
    line = (
        f"{running} running · {items['total']} items: {items['done']} done · "
        f"{items['pending']} pending · {items['failed']} failed"
    )
    if items["waiting"]:
        line += f" ({items['waiting']} waiting for a person)"
    return f"{line} · {items['expanded']} expanded"


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _age(value: JSON) -> str:
    return "none" if value is None else f"{value}s"
