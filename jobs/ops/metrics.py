"""Prometheus metrics, read from Postgres at scrape time: they survive restarts and agree
across processes, unlike counters kept in one process's memory (or Flower's)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from jobs.engine.runtime import Runtime
from jobs.worker.queues import queue_depths
from ledger import (
    COUNT_CAP,
    WAITING_CAP,
    EventKind,
    Histogram,
    ItemState,
    LedgerStats,
    LimitLedger,
    MalformedMessages,
    SignalLedger,
    TimerLedger,
)
from ledger.map_views import MapViews

#: Histograms cover this many recent seconds.
WINDOW: Final = 3600.0
#: Step duration buckets, in seconds.
STEP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Schedule-to-start buckets, in seconds.
START_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class LedgerCollector(Collector):
    """Collects oncelery's metrics from the ledger and the broker."""

    def __init__(self, rt: Runtime, app: Celery) -> None:
        self.stats = LedgerStats(engine=rt.engine)
        self.malformed = MalformedMessages(engine=rt.engine)
        self.maps = MapViews(engine=rt.engine)
        self.timers = TimerLedger(engine=rt.engine)
        self.limits = LimitLedger(engine=rt.engine)
        self.signals = SignalLedger(engine=rt.engine, keep_for=rt.settings.signal_keep_for)
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        """Read everything once per scrape."""
        snapshot = self.stats.snapshot(window=WINDOW)
        jobs = GaugeMetricFamily("oncelery_jobs", "Jobs by state.", labels=["state"])
        for state, count in snapshot.jobs.items():
            jobs.add_metric([str(state)], count)
        yield jobs
        depth = GaugeMetricFamily(
            "oncelery_queue_depth", "Messages waiting per queue.", labels=["queue"]
        )
        for queue, waiting in queue_depths(self.app).items():
            if waiting is not None:
                depth.add_metric([queue], waiting)
        yield depth
        yield GaugeMetricFamily(
            "oncelery_oldest_pending_job_age_seconds",
            "Age of the oldest job no worker has claimed yet (0 when none).",
            value=snapshot.oldest_pending_age or 0.0,
        )
        yield GaugeMetricFamily(
            "oncelery_dead_letters_open",
            "Dead letters waiting for a person.",
            value=snapshot.open_dead_letters,
        )
        yield from _counters(snapshot.events)
        yield self._malformed()
        yield from self._maps()
        yield from self._timers()
        yield from self._limits()
        yield from self._signals()
        yield _histogram(
            "oncelery_schedule_to_start_seconds",
            "Seconds from a job's creation to its first claim (jobs started in the last hour).",
            {"": self.stats.schedule_to_start(START_BUCKETS, window=WINDOW)},
            scale=1.0,
        )
        yield _histogram(
            "oncelery_step_duration_seconds",
            "Duration of successful step attempts in the last hour.",
            self.stats.step_histograms([b * 1000 for b in STEP_BUCKETS], window=WINDOW),
            scale=0.001,
        )

    def _malformed(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "oncelery_malformed_messages",
            "Step messages that could not be run, by task and reason: `arguments` and "
            "`job_id` were rejected (to the dead-letter queue on RabbitMQ), `no_such_job` "
            "acknowledged.",
            labels=["task", "reason"],
        )
        for counted in self.malformed.counts():
            family.add_metric([counted.task, counted.reason], counted.count)
        return family

    def _timers(self) -> Iterator[GaugeMetricFamily]:
        found = self.timers.stats()
        yield GaugeMetricFamily(
            "oncelery_jobs_waiting_on_timers",
            "Active jobs waiting for a timer (a sleep step, a wait for a signal's timeout, a "
            f"long retry); counted up to {WAITING_CAP:,}.",
            value=found.waiting_jobs,
        )
        pending = GaugeMetricFamily(
            "oncelery_timers_pending",
            f"Pending timers by due time (`overdue`: due and not fired yet); each counted up "
            f"to {COUNT_CAP:,}.",
            labels=["due"],
        )
        for due, count in found.pending.items():
            pending.add_metric([due], count)
        yield pending
        lateness = GaugeMetricFamily(
            "oncelery_timer_lateness_seconds",
            "Seconds from due to fired of the timers fired in the last five minutes, by "
            "quantile (absent when none fired).",
            labels=["quantile"],
        )
        for quantile, value in (("0.5", found.late_p50), ("0.99", found.late_p99)):
            if value is not None:
                lateness.add_metric([quantile], value)
        if found.late_max is not None:
            lateness.add_metric(["1"], found.late_max)
        yield lateness

    def _limits(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per limit key used or waited for lately (the busiest 50: a key per customer would
        be too many labels)."""
        found = self.limits.stats()
        families = {
            "in_use": GaugeMetricFamily(
                "oncelery_limit_in_use",
                "Slots held now (concurrency limits), tokens granted in the last second (rate).",
                labels=["key", "kind"],
            ),
            "waiting": GaugeMetricFamily(
                "oncelery_limit_waiting",
                "Runs waiting for a limit's token or slot (pending limit timers; counted up "
                "to 10,001 a key: that many means more).",
                labels=["key", "kind"],
            ),
        }
        throttled = CounterMetricFamily(
            "oncelery_limit_throttled",
            "Runs a limit made wait, in all.",
            labels=["key", "kind"],
        )
        granted = CounterMetricFamily(
            "oncelery_limit_granted", "Tokens a rate limit granted, in all.", labels=["key"]
        )
        for each in found:
            labels = [each.key, str(each.kind)]
            families["in_use"].add_metric(labels, each.in_use)
            families["waiting"].add_metric(labels, each.waiting)
            throttled.add_metric(labels, each.throttled_total)
            if each.kind == "rate":
                granted.add_metric([each.key], each.granted_total)
        yield from families.values()
        yield throttled
        yield granted

    def _signals(self) -> Iterator[GaugeMetricFamily]:
        kept, waiting = self.signals.counts()
        yield GaugeMetricFamily(
            "oncelery_jobs_waiting_for_signals",
            "Active jobs waiting for a signal (a wait step; its timeout is a timer too).",
            value=waiting,
        )
        yield GaugeMetricFamily(
            "oncelery_signals_kept",
            "Signals no wait has taken yet (sent before any job waited for them), within "
            "their lifetime (ONCELERY_SIGNAL_KEEP_FOR).",
            value=kept,
        )
        yield GaugeMetricFamily(
            "oncelery_signals_expired",
            "Signals kept past their lifetime: no wait takes them, `oncelery prune` deletes them.",
            value=self.signals.expired(),
        )

    def _maps(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Labelled by pipeline and step only: never a job or an item (a map may have 100,000).
        labels = ["pipeline", "step"]
        running = GaugeMetricFamily(
            "oncelery_maps_running", "Map steps fanned out and not joined yet.", labels=labels
        )
        items = GaugeMetricFamily(
            "oncelery_map_items",
            "Items of the maps not joined yet, by state (`failed`: settled, the join reads "
            "it; `waiting`: failed, waiting for a person), from the maps' counters.",
            labels=[*labels, "state"],
        )
        for found in self.maps.in_progress():
            where = [found.pipeline, found.step]
            running.add_metric(where, found.maps)
            by_state = {
                ItemState.PENDING: found.pending,
                ItemState.DONE: found.done,
                ItemState.FAILED: found.failed - found.waiting,
                ItemState.WAITING: found.waiting,
            }
            for state, count in by_state.items():
                items.add_metric([*where, str(state)], count)
        joined = CounterMetricFamily(
            "oncelery_maps_joined", "Map steps whose join was handed on.", labels=labels
        )
        for (pipeline, step), count in self.maps.joined().items():
            joined.add_metric([pipeline, step], count)
        yield running
        yield items
        yield joined


def _counters(events: dict[EventKind, int]) -> Iterator[CounterMetricFamily]:
    yield CounterMetricFamily(
        "oncelery_step_retries",
        "Step attempts that failed and were retried.",
        value=events[EventKind.FAILED],
    )
    yield CounterMetricFamily(
        "oncelery_dead_lettered",
        "Jobs dead-lettered (a job may be again after a replay).",
        value=events[EventKind.DEAD_LETTERED],
    )
    yield CounterMetricFamily(
        "oncelery_duplicates_absorbed",
        "Deliveries whose key the ledger had already recorded: acted on zero times, not twice.",
        value=events[EventKind.DUPLICATE] + events[EventKind.DEDUPLICATED],
    )
    yield CounterMetricFamily(
        "oncelery_redrives",
        "Stalled jobs the sweeper sent again.",
        value=events[EventKind.REDRIVEN],
    )


def _histogram(
    name: str, documentation: str, histograms: dict[str, Histogram], *, scale: float
) -> HistogramMetricFamily:
    labelled = any(histograms)
    family = HistogramMetricFamily(name, documentation, labels=["step"] if labelled else None)
    for label, histogram in histograms.items():
        buckets = [
            (_bound(bound * scale), count)
            for bound, count in zip(histogram.bounds, histogram.cumulative, strict=True)
        ]
        buckets.append(("+Inf", histogram.count))
        family.add_metric([label] if labelled else [], buckets, histogram.total * scale)
    return family


def _bound(value: float) -> str:
    return f"{value:g}"


def render_metrics(rt: Runtime, app: Celery) -> tuple[bytes, str]:
    """The Prometheus exposition text, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(rt, app))
    return generate_latest(registry), CONTENT_TYPE_LATEST
