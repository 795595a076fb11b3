"""`oncelery demo --pipeline places-crawl`: start the sandbox and real workers, enqueue crawls
of a few dense areas of the sandbox's world, wait for them, and report what the audit counts
at the provider: billed queries (and any twice for one body), places against the truth,
datasets."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import httpx

from config import Settings
from jobs.engine.enqueue import start_jobs
from jobs.ops.audit import AuditReport, effect_steps, fetch_effects, reconcile, with_crawls
from jobs.ops.crawl_audit import truth_at
from jobs.ops.effects import Effect
from jobs.pipelines import Pipeline
from jobs.places import places_crawl
from jobs.tools.harness import Harness, Progress
from jobs.worker import CeleryDispatch
from ledger import JSON, Job, JobState


@dataclass(frozen=True)
class Area:
    """A crawl's area and categories."""

    name: str
    lat: float
    lng: float
    radius_m: float
    categories: tuple[str, ...]


#: The areas the demo crawls, in turn: the dense spots of the sandbox's world (seed 1), each
#: needing three or four levels of splitting and 100–550 queries.
AREAS: tuple[Area, ...] = (
    Area("south village", 48.5868, 2.1891, 3_000.0, ("hotel", "museum", "pharmacy")),
    Area("east town", 48.8206, 2.6937, 2_000.0, ("hotel", "museum", "pharmacy")),
    Area("west suburb", 48.9016, 2.1059, 2_000.0, ("hotel", "museum", "pharmacy")),
    Area("city", 48.8566, 2.3522, 1_500.0, ("museum", "pharmacy")),
)


@dataclass(frozen=True)
class CrawlDemoOptions:
    """What the crawl demo runs."""

    crawls: int = 3
    fault_rate: float = 0.0
    timeout_rate: float = 0.0
    lost_reply_rate: float = 0.0
    latency_ms: int = 0
    workers: int = 2
    concurrency: int = 2
    timeout: float = 600.0
    #: The sandbox's cap on searches per second (above it: 429 with `Retry-After`).
    places_rate: int | None = None


@dataclass(frozen=True)
class CrawlDemoReport:
    """The crawl demo's figures, counted at the provider by the audit."""

    crawls: int
    completed: int
    dead_lettered: int
    stuck: int
    queries: int
    duplicate_queries: int
    places_found: int
    places_expected: int | None
    datasets: int
    duplicate_datasets: int
    #: Searches the sandbox received for these crawls (faults and repeats included), and
    #: those it refused with 429 for its rate cap.
    search_requests: int
    rate_limited: int
    #: The deepest split any crawl went to, and circles recorded as saturated.
    levels: int
    saturated: int
    seconds: float
    audit_clean: bool
    drift: list[dict[str, JSON]] = field(default_factory=list)
    database: str = ""
    broker: str = ""
    logs: str = ""

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return asdict(self)


def crawl_events(count: int, prefix: str) -> list[tuple[str, dict[str, JSON]]]:
    """`count` crawls (event id, payload) whose event and crawl ids start with `prefix`, over
    `AREAS` in turn."""
    events = []
    for number in range(count):
        area = AREAS[number % len(AREAS)]
        payload: dict[str, JSON] = {
            "crawl_id": f"{prefix}{number}",
            "lat": area.lat,
            "lng": area.lng,
            "radius_m": area.radius_m,
            "categories": list(area.categories),
        }
        events.append((f"{prefix}{number}", payload))
    return events


def enqueue_crawls(harness: Harness, events: Sequence[tuple[str, dict[str, JSON]]]) -> None:
    """Start one places-crawl job per event."""
    pipeline: Pipeline[object] = places_crawl  # type: ignore[assignment]
    jobs = [
        pipeline.new_job(event_id, pipeline.validate_input(payload)) for event_id, payload in events
    ]
    start_jobs(harness.store, CeleryDispatch(), pipeline, jobs)


def run_crawl_demo(
    settings: Settings, options: CrawlDemoOptions, progress: Progress
) -> CrawlDemoReport:
    """Run the crawl demo from start to finish; every process it starts is stopped before it
    returns."""
    harness = Harness.prepare(settings, "crawl")
    faults = [
        "--fault-rate",
        str(options.fault_rate),
        "--timeout-rate",
        str(options.timeout_rate),
        "--lost-reply-rate",
        str(options.lost_reply_rate),
        "--latency-ms",
        str(options.latency_ms),
        "--hang-seconds",
        str(max(1.0, settings.provider_timeout * 2)),
    ]
    if options.places_rate is not None:
        faults += ["--places-rate", str(options.places_rate)]
    try:
        harness.start_sandbox(faults)
        for _ in range(options.workers):
            harness.start_worker(options.concurrency)
        events = crawl_events(options.crawls, harness.prefix)
        began = time.monotonic()
        enqueue_crawls(harness, events)
        counts = harness.wait(len(events), options.timeout, progress)
        seconds = time.monotonic() - began
        jobs = harness.store.jobs_with_event_prefix(harness.prefix)
        audit = audit_crawl_run(harness, jobs)
        searches, refused = search_requests(settings.provider_url, jobs)
    finally:
        harness.stop()
    crawls = audit.crawls or {}
    return CrawlDemoReport(
        crawls=len(events),
        completed=counts[JobState.SUCCEEDED],
        dead_lettered=counts[JobState.DEAD_LETTERED],
        stuck=counts[JobState.PENDING] + counts[JobState.RUNNING],
        queries=_int(crawls.get("queries")),
        duplicate_queries=_int(crawls.get("duplicate_queries")),
        places_found=_int(crawls.get("places_found")),
        places_expected=_optional_int(crawls.get("places_expected")),
        datasets=_int(crawls.get("datasets")),
        duplicate_datasets=_int(crawls.get("duplicate_datasets")),
        search_requests=searches,
        rate_limited=refused,
        levels=max((_levels(job) for job in jobs), default=0),
        saturated=_int(crawls.get("saturated")),
        seconds=round(seconds, 2),
        audit_clean=audit.clean,
        drift=[d.as_json() for d in audit.drift],
        database=harness.store.engine.url.render_as_string(hide_password=True),
        broker=settings.broker_kind,
        logs=str(harness.log_dir),
    )


def audit_crawl_run(harness: Harness, jobs: Sequence[Job]) -> AuditReport:
    """Reconcile some crawls' ledger entries (their items' and datasets' keys) with the
    provider's effects for them, then count each crawl's queries, datasets and places."""
    pipeline: Pipeline[object] = places_crawl  # type: ignore[assignment]
    steps = effect_steps([pipeline])
    item_prefixes = tuple(f"{job.step_keys['search']}/" for job in jobs)
    dataset_keys = {job.step_keys["publish"] for job in jobs}
    crawl_ids = {str(job.context.get("crawl_id")) for job in jobs}
    entries = [
        (name, entry)
        for name, entry in harness.store.entries_of_steps(list(steps))
        if entry.key.startswith(item_prefixes) or entry.key in dataset_keys
    ]
    effects = [
        effect
        for effect in fetch_effects(harness.settings.provider_url)
        if _in_run(effect, item_prefixes, dataset_keys, crawl_ids)
    ]
    kinds = {entry.key: steps[(name, entry.step)] for name, entry in entries}
    report = reconcile([entry for _, entry in entries], kinds, effects)
    return with_crawls(report, jobs, effects, truth_at(harness.settings.provider_url))


def _in_run(
    effect: Effect, item_prefixes: tuple[str, ...], dataset_keys: set[str], crawl_ids: set[str]
) -> bool:
    key = effect.idempotency_key or ""
    return key.startswith(item_prefixes) or key in dataset_keys or effect.crawl_id in crawl_ids


def search_requests(provider_url: str, jobs: Sequence[Job]) -> tuple[int, int]:
    """How many searches the sandbox received for some crawls (by their items' keys), and
    how many of them it refused with 429."""
    prefixes = tuple(f"{job.step_keys['search']}/" for job in jobs)
    response = httpx.get(
        f"{provider_url}/sandbox/requests", params={"service": "places"}, timeout=30
    )
    response.raise_for_status()
    ours = [
        request
        for request in response.json()
        if str(request.get("idempotency_key") or "").startswith(prefixes)
    ]
    return len(ours), sum(1 for request in ours if request.get("status") == 429)


def _levels(job: Job) -> int:
    published = job.results.get("publish")
    levels = published.get("levels") if isinstance(published, dict) else None
    return levels if isinstance(levels, int) else 0


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) else None
