"""`oncelery audit`: reconcile the ledger with what the provider says it applied, effect by
effect. Drift is any effect without a ledger record, two effects for one key or one order, a
ledger success the provider never saw, or a charge whose amount is not what its order says."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from uuid import UUID

import httpx

from config import Settings
from jobs.engine.runtime import declared_pipelines, load_pipelines
from jobs.errors import ProviderUnavailable
from jobs.maps import is_map
from jobs.ops.crawl_audit import Truth, audit_crawls, truth_at
from jobs.ops.crawl_audit import summary as crawl_summary
from jobs.ops.effects import Drift, Effect
from jobs.ops.fulfilment_audit import audit_fulfilment
from jobs.orders import ORDER_FULFILMENT
from jobs.pipelines import Pipeline
from jobs.places import PLACES_CRAWL
from jobs.sandbox import SandboxStore, unit_amount
from jobs.tasks import PIPELINE_PREFIX, STEP
from ledger import JSON, Job, JobStore, MapLedger, StepEntry, StepState, create_engine
from ledger.map_views import MapViews

#: The most places crawls the audit reads (the most recent).
MAX_CRAWLS = 100_000
#: The most order-fulfilment jobs the audit reads (the most recent).
MAX_FULFILMENTS = 100_000
#: Ledger states that may stand behind an applied effect.
_MAY_HAVE_ACTED = (StepState.SUCCEEDED, StepState.UNKNOWN)


@dataclass(frozen=True)
class Scope:
    """What to reconcile: everything (no keys, no prefix), or some jobs' keys and orders."""

    keys: frozenset[str] | None = None
    order_prefix: str | None = None

    def covers_effect(self, effect: Effect) -> bool:
        """Whether the effect is in scope."""
        if self.keys is None and self.order_prefix is None:
            return True
        if self.keys is not None and effect.idempotency_key in self.keys:
            return True
        return bool(self.order_prefix and (effect.order_id or "").startswith(self.order_prefix))


@dataclass(frozen=True)
class AuditReport:
    """The audit's findings."""

    effects: Mapping[str, int]
    duplicates: Mapping[str, int]
    ledger_entries: int
    in_flight: int
    drift: Sequence[Drift] = field(default_factory=tuple)
    #: The places crawls' figures added up (`jobs.ops.crawl_audit.summary`), if any was run.
    crawls: Mapping[str, JSON] | None = None
    #: The fulfilment orders' figures (`jobs.ops.fulfilment_audit`), if any was run.
    fulfilment: Mapping[str, JSON] | None = None

    @property
    def clean(self) -> bool:
        """No drift at all."""
        return not self.drift

    def as_json(self) -> dict[str, JSON]:
        """For `--json`."""
        return {
            "clean": self.clean,
            "effects": dict(self.effects),
            "duplicates": dict(self.duplicates),
            "ledger_entries": self.ledger_entries,
            "in_flight": self.in_flight,
            "drift": [d.as_json() for d in self.drift],
            **({"crawls": dict(self.crawls)} if self.crawls is not None else {}),
            **({"fulfilment": dict(self.fulfilment)} if self.fulfilment is not None else {}),
        }


def effect_steps(pipelines: Iterable[Pipeline[object]]) -> dict[tuple[str, str], str]:
    """(pipeline, step) → effect kind, for every step that applies an outside effect."""
    return {
        (pipeline.name, step.name): step.effect
        for pipeline in pipelines
        for step in pipeline.steps
        if step.effect is not None
    }


def _without_fan_outs(
    store: JobStore, entries: list[tuple[str, StepEntry]]
) -> list[tuple[str, StepEntry]]:
    """The entries but for map steps' own keys: a map step's effect is its items' (whose
    keys are entries of the same step); its own run only computed them."""
    maps = {(p.name, s.name) for p in declared_pipelines() for s in p.steps if is_map(s)}
    mapped = [entry.key for pipeline, entry in entries if (pipeline, entry.step) in maps]
    if not mapped:
        return entries
    items = MapLedger(engine=store.engine, lease_seconds=1.0).item_keys(mapped)
    return [(p, e) for p, e in entries if (p, e.step) not in maps or e.key in items]


def call_effect_steps(store: JobStore) -> dict[tuple[str, str], str]:
    """(pipeline, step) → effect kind for decorated Celery tasks that apply effects: their
    calls' jobs say which (no process here declares them, `jobs.tasks`)."""
    found = store.effects_in_context(pipeline_prefix=PIPELINE_PREFIX)
    return {(pipeline, STEP): kind for pipeline, kind in found.items()}


def reconcile(
    entries: Sequence[StepEntry],
    kinds_by_key: Mapping[str, str],
    effects: Sequence[Effect],
    *,
    amounts: Mapping[str, int] | None = None,
) -> AuditReport:
    """Compare ledger entries of effectful steps with the provider's effects.

    Args:
        entries: the ledger entries in scope, of steps that apply effects.
        kinds_by_key: each of those entries' effect kind, by key.
        effects: the provider's effects in scope.
        amounts: the amount each key's effect must carry, by key (see `order_amounts`).
    """
    by_key: dict[str, list[Effect]] = defaultdict(list)
    drift: list[Drift] = []
    for effect in effects:
        if effect.idempotency_key is None:
            drift.append(Drift("effect_without_key", effect.kind, None, effect.order_id))
        else:
            by_key[effect.idempotency_key].append(effect)
    ledger = {entry.key: entry for entry in entries}
    in_flight = 0
    for key, applied in sorted(by_key.items()):
        entry = ledger.get(key)
        first = applied[0]
        if len(applied) > 1:
            drift.append(
                Drift(
                    "duplicate_effect",
                    first.kind,
                    key,
                    first.order_id,
                    f"{len(applied)} effects for one key",
                )
            )
        drift.extend(_wrong_amounts(key, applied, (amounts or {}).get(key)))
        if entry is None:
            drift.append(Drift("effect_without_ledger_record", first.kind, key, first.order_id))
        elif entry.state is StepState.STARTED:
            in_flight += 1
        elif entry.state not in _MAY_HAVE_ACTED:
            drift.append(
                Drift(
                    "effect_for_failed_step",
                    first.kind,
                    key,
                    first.order_id,
                    f"ledger says {entry.state}",
                )
            )
    for key, entry in sorted(ledger.items()):
        if entry.state is StepState.SUCCEEDED and key not in by_key:
            drift.append(Drift("success_without_effect", kinds_by_key.get(key, "?"), key))
    duplicates = _duplicates_per_order(effects, drift)
    return AuditReport(
        effects=dict(Counter(effect.kind for effect in effects)),
        duplicates=duplicates,
        ledger_entries=len(entries),
        in_flight=in_flight,
        drift=tuple(drift),
    )


def _wrong_amounts(key: str, applied: Sequence[Effect], expected: int | None) -> list[Drift]:
    """Effects whose amount is not the one their order says (the right count of effects
    for the wrong money is drift too)."""
    if expected is None:
        return []
    return [
        Drift(
            "wrong_amount",
            effect.kind,
            key,
            effect.order_id,
            f"applied {effect.amount}, the order says {expected}",
        )
        for effect in applied
        if effect.amount != expected
    ]


def order_amounts(
    entries: Sequence[StepEntry], kinds_by_key: Mapping[str, str], store: JobStore
) -> dict[str, int]:
    """What each charge key's effect must amount to: the items of the order it was charged
    for (the job's row, not anything a step recorded) at the sandbox's prices."""
    charges = [entry for entry in entries if kinds_by_key.get(entry.key) == "charge"]
    contexts = store.contexts([entry.job_id for entry in charges])
    amounts = {}
    for entry in charges:
        amount = _priced(contexts.get(entry.job_id))
        if amount is not None:
            amounts[entry.key] = amount
    return amounts


def _priced(context: Mapping[str, JSON] | None) -> int | None:
    """An order context's total at the sandbox's prices; None for a context of another shape."""
    items = context.get("items") if context is not None else None
    if not isinstance(items, list):
        return None
    total = 0
    for item in items:
        if not isinstance(item, dict):
            return None
        sku, quantity = item.get("sku"), item.get("quantity")
        if not isinstance(sku, str) or not isinstance(quantity, int):
            return None
        total += unit_amount(sku) * quantity
    return total


def _duplicates_per_order(effects: Sequence[Effect], drift: list[Drift]) -> dict[str, int]:
    # Per template too: an order may be told several things (confirmed, then shipped), each once.
    per_order = Counter(
        (effect.kind, effect.order_id, effect.template) for effect in effects if effect.order_id
    )
    duplicates: Counter[str] = Counter({effect.kind: 0 for effect in effects})
    for (kind, order_id, template), count in sorted(
        per_order.items(), key=lambda item: str(item[0])
    ):
        if count > 1:
            duplicates[kind] += count - 1
            what = f"{kind} ({template})" if template else kind
            drift.append(
                Drift(
                    "duplicate_effect_for_order",
                    kind,
                    None,
                    order_id,
                    f"{count} {what} effects for one order",
                )
            )
    return dict(duplicates)


def fetch_effects(provider_url: str, *, timeout: float = 30.0) -> list[Effect]:
    """The effects a running sandbox provider reports.

    Raises:
        ProviderUnavailable: nothing answers at `provider_url`.
    """
    try:
        response = httpx.get(f"{provider_url}/sandbox/effects", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(provider_url, str(exc) or type(exc).__name__) from exc
    return [Effect.from_json(item) for item in response.json()]


def effects_from_file(path: Path) -> list[Effect]:
    """The effects recorded in a (stopped) sandbox's SQLite file."""
    store = SandboxStore(path)
    try:
        return [
            Effect(
                str(row.kind),
                row.idempotency_key,
                row.order_id,
                row.amount,
                crawl_id=row.crawl_id,
                body=json.loads(json.dumps(row.body)),
                template=row.template,
            )
            for row in store.list_effects()
        ]
    finally:
        store.close()


def run_audit(settings: Settings, *, sandbox_db: Path | None = None) -> tuple[AuditReport, str]:
    """Audit every effectful step's entries against the provider's effects.

    The effects come from `sandbox_db` if given, else from the provider at `PROVIDER_URL`, else
    (nothing answers there) from the sandbox file in the data folder, where `oncelery demo`
    leaves it.

    Returns:
        The report, and where the effects were read.
    """
    truth: Truth | None = None
    if sandbox_db is None:
        try:
            effects, source = fetch_effects(settings.provider_url), settings.provider_url
            truth = truth_at(settings.provider_url)
        except ProviderUnavailable:
            sandbox_db = settings.data_dir / "sandbox.sqlite3"
            if not sandbox_db.exists():
                raise
    if sandbox_db is not None:
        if not sandbox_db.exists():
            raise ProviderUnavailable(str(sandbox_db), "no such sandbox file")
        effects, source = effects_from_file(sandbox_db), str(sandbox_db)
    load_pipelines(settings)
    steps = effect_steps(declared_pipelines())
    store = JobStore(engine=create_engine(settings.database_url))
    try:
        steps.update(call_effect_steps(store))
        entries = _without_fan_outs(store, store.entries_of_steps(list(steps)))
        kinds = {entry.key: steps[(pipeline, entry.step)] for pipeline, entry in entries}
        in_scope = [entry for _, entry in entries]
        amounts = order_amounts(in_scope, kinds, store)
        crawls = store.list_jobs(pipeline=PLACES_CRAWL, limit=MAX_CRAWLS)
        orders = store.list_jobs(pipeline=ORDER_FULFILMENT, limit=MAX_FULFILMENTS)
        maps = map_drift(MapViews(engine=store.engine))
    finally:
        store.engine.dispose()
    report = reconcile(in_scope, kinds, effects, amounts=amounts)
    report = replace(report, drift=(*report.drift, *maps))
    report = with_fulfilment(report, orders, effects)
    return with_crawls(report, crawls, effects, truth), source


def map_drift(views: MapViews, *, of_jobs: Collection[UUID] | None = None) -> list[Drift]:
    """The maps (of `of_jobs` only, if given) whose counters disagree with their items, or
    whose join with its job (an item counted twice or not at all, a join run early or
    lost): one drift each."""
    return [
        Drift(
            problem="map_mismatch",
            kind="map",
            key=None,
            detail=f"{found.pipeline}.{found.step} of job {found.job_id}: "
            + "; ".join(found.problems),
        )
        for found in views.mismatched()
        if of_jobs is None or found.job_id in of_jobs
    ]


def with_fulfilment(
    report: AuditReport, jobs: Sequence[Job], effects: Sequence[Effect]
) -> AuditReport:
    """The report with the fulfilment orders' figures and drift (`jobs.ops.fulfilment_audit`)."""
    if not any(job.pipeline == ORDER_FULFILMENT for job in jobs):
        return report
    figures, drift = audit_fulfilment(jobs, effects)
    return replace(report, drift=(*report.drift, *drift), fulfilment=figures.as_json())


def with_crawls(
    report: AuditReport, jobs: Sequence[Job], effects: Sequence[Effect], truth: Truth | None
) -> AuditReport:
    """The report with the places crawls' figures and drift (`jobs.ops.crawl_audit`)."""
    if not jobs:
        return report
    figures, drift = audit_crawls(jobs, effects, truth)
    return replace(report, drift=(*report.drift, *drift), crawls=crawl_summary(figures))
