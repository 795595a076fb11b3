"""`oncelery chaos --map N`: one map of N items (and what they split into) under fire —
provider faults, workers SIGKILLed every few seconds, the broker and Postgres restarted —
then every item's notification counted at the provider (each exactly once, the join once) and
the map's counters checked against its items."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from uuid import UUID

from config import Settings
from jobs.engine.enqueue import start_jobs
from jobs.ops.audit import fetch_effects, map_drift
from jobs.tools.chaos import CHAOS_ENVIRONMENT, ChaosOptions, Mayhem
from jobs.tools.harness import Harness, Progress
from jobs.tools.visits import JOINED, expected_items, order_of, visits
from jobs.worker import CeleryDispatch
from ledger import JobState, LedgerError, MapLedger
from ledger.map_views import MapViews


@dataclass(frozen=True)
class MapChaosReport:
    """The run's figures, counted at the provider, and every broken invariant."""

    broker: str
    #: Items the map must have (its roots and what they split into).
    items: int
    #: Items whose notification the provider applied (once or more).
    visited: int
    duplicate_visits: int
    missing_visits: int
    joins: int
    job_state: str
    kills: int
    restarts: int
    seconds: float
    violations: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def ok(self) -> bool:
        """Every item once, the join once, the job done."""
        return not self.violations

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        """One line."""
        return (
            f"chaos --map {self.broker}: items={self.items} visited={self.visited} "
            f"duplicate_visits={self.duplicate_visits} missing_visits={self.missing_visits} "
            f"joins={self.joins} job={self.job_state} kills={self.kills} "
            f"restarts={self.restarts} violations={len(self.violations)} "
            f"seconds={self.seconds:.1f} -> {'OK' if self.ok else 'FAILED'}"
        )


def run_map_chaos(settings: Settings, options: ChaosOptions, progress: Progress) -> MapChaosReport:
    """Run one map of `options.orders` roots while workers are SIGKILLed (and the broker and
    Postgres restarted, if asked), wait for its job to end, and count at the provider; every
    process it starts is stopped before it returns."""
    env = {**CHAOS_ENVIRONMENT, "ONCELERY_PIPELINES": "jobs.tools.visits"}
    harness = Harness.prepare(settings, "map", env)
    mayhem = Mayhem(harness, options, random.Random(options.seed))
    expected = expected_items(options.orders)
    timeout = options.timeout or 180.0 + len(expected) * 0.1
    maps = MapLedger(engine=harness.store.engine, lease_seconds=settings.step_lease)
    try:
        harness.start_sandbox(
            [
                *("--fault-rate", str(options.fault_rate)),
                *("--timeout-rate", str(options.timeout_rate)),
                *("--hang-seconds", "2"),
            ]
        )
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        harness.start_beat()
        run = f"{harness.prefix}visits"
        job = visits.new_job(run, {"run": run, "roots": options.orders})
        began = time.monotonic()
        mayhem.next_kill = began + options.kill_every
        [started] = start_jobs(harness.store, CeleryDispatch(), visits, [job])  # type: ignore[arg-type]
        deadline = began + timeout
        while time.monotonic() < deadline:
            done = _items_done(maps, UUID(started.job_id))
            progress(done, len(expected))
            if _ended(harness):
                break
            mayhem.tick(done / max(len(expected), 1))
            time.sleep(0.5)
        seconds = time.monotonic() - began
        time.sleep(2.0)  # let a killed worker's orphans finish what they were doing
        return _report(harness, run, expected, mayhem, seconds)
    finally:
        harness.stop()


def _items_done(maps: MapLedger, job_id: UUID) -> int:
    try:
        return sum(counters.done for counters in maps.counters(job_id))
    except LedgerError:
        return 0  # the database may be restarting: ask again later


def _ended(harness: Harness) -> bool:
    counts = harness.counts()
    if counts is None:
        return False
    return any(counts[state] for state in (JobState.SUCCEEDED, JobState.DEAD_LETTERED))


def _report(
    harness: Harness, run: str, expected: list[str], mayhem: Mayhem, seconds: float
) -> MapChaosReport:
    prefix = order_of(run, "")
    notified = Counter(
        (effect.order_id or "")[len(prefix) :]
        for effect in fetch_effects(harness.settings.provider_url)
        if effect.kind == "notification" and (effect.order_id or "").startswith(prefix)
    )
    joins = notified.pop("join", 0)
    jobs = harness.store.jobs_with_event_prefix(run)
    state = str(jobs[0].state) if jobs else "never seen"
    violations = [] if state == JobState.SUCCEEDED else [f"the map's job is {state}"]
    if joins != 1:
        violations.append(f"{JOINED}: {joins} notifications, expected 1")
    wanted = set(expected)
    missing = [item for item in expected if not notified[item]]
    doubled = {item: n for item, n in notified.items() if n > 1}
    violations += [f"item {item}: no notification" for item in missing[:50]]
    violations += [f"item {item}: {n} notifications" for item, n in list(doubled.items())[:50]]
    violations += [f"item {item}: not an item of the map" for item in set(notified) - wanted]
    views = MapViews(engine=harness.store.engine)
    violations += [drift.detail for drift in map_drift(views, of_jobs={job.id for job in jobs})]
    return MapChaosReport(
        broker=harness.settings.broker_kind,
        items=len(expected),
        visited=len(set(notified) & wanted),
        duplicate_visits=sum(n - 1 for n in doubled.values()),
        missing_visits=len(missing),
        joins=joins,
        job_state=state,
        kills=mayhem.kills,
        restarts=len(mayhem.restarts),
        seconds=round(seconds, 1),
        violations=violations,
        logs=str(harness.log_dir),
    )
