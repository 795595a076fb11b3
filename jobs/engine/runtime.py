"""`Runtime`: what one process needs to run steps: its engine, ledger, store and the pipelines'
resources, built after the fork so no connection is ever shared between processes."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from config import SHIPPED_PIPELINES, ConfigError, Settings
from jobs.engine.crashpoints import Crasher
from jobs.engine.leases import LeaseKeeper
from jobs.errors import UnknownPipeline
from jobs.limits import check_limits, effective_limits, missing_fields, rules_of
from jobs.pipelines import Pipeline, Step, registry
from jobs.retry import RetryPolicy, effective_policy
from ledger import (
    JobStore,
    LimitLedger,
    LimitRules,
    MapLedger,
    SignalLedger,
    StepLedger,
    TimerLedger,
    create_engine,
)


@dataclass
class Runtime:
    """One process's connections and resources."""

    settings: Settings
    engine: Engine
    ledger: StepLedger
    store: JobStore
    retry_policy: RetryPolicy
    crash: Crasher = field(default_factory=lambda: Crasher((), Path()))
    pid: int = field(default_factory=os.getpid)
    _resources: dict[str, object] = field(default_factory=dict)
    _leases: LeaseKeeper | None = None
    _maps: MapLedger | None = None
    _timers: TimerLedger | None = None
    _limits: LimitLedger | None = None
    _limit_rules: dict[tuple[str, str], LimitRules | None] = field(default_factory=dict)
    _signals: SignalLedger | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, engine: Engine | None = None) -> Runtime:
        """Open an engine (or take `engine`) and build the ledger and store on it."""
        engine = engine or create_engine(settings.database_url)
        ledger = StepLedger(engine=engine, lease_seconds=settings.step_lease)
        ledger.signal_keep_for = settings.signal_keep_for
        return cls(
            settings=settings,
            engine=engine,
            ledger=ledger,
            store=JobStore(engine=engine),
            retry_policy=RetryPolicy(
                max_attempts=settings.retry_max_attempts,
                backoff_base=settings.retry_backoff_base,
                backoff_max=settings.retry_backoff_max,
            ),
            crash=Crasher(settings.crash_points, settings.data_dir / "crash-markers"),
        )

    def retry_policy_for(self, pipeline: str, step: Step[object]) -> RetryPolicy:
        """The step's retry policy: settings override, then the step's own, then the default."""
        configured = self.settings.step_policies.get(f"{pipeline}.{step.name}")
        return effective_policy(self.retry_policy, step.retry, configured)

    def limits_for(self, pipeline: str, step: Step[object]) -> LimitRules | None:
        """The limits a step's claims take (a map step's: its items'; None: none): the
        settings' by kind, else the step's own."""
        found = self._limit_rules
        if (pipeline, step.name) not in found:
            configured = self.settings.limits.get(f"{pipeline}.{step.name}")
            limits = effective_limits(step.limits, configured)
            found[(pipeline, step.name)] = rules_of(limits, items=hasattr(step, "each"))
        return found[(pipeline, step.name)]

    def time_limit_for(self, pipeline: Pipeline[object], step: Step[object]) -> float:
        """Seconds one attempt of the step may take (soft limit)."""
        return step_time_limit(self.settings, pipeline, step.name)

    @property
    def leases(self) -> LeaseKeeper:
        """This process's lease keeper (its thread starts with the first claim it holds)."""
        if self._leases is None:
            ledger = self.ledger
            self._leases = LeaseKeeper(ledger.renew_leases, lease=ledger.lease_seconds)
        return self._leases

    @property
    def maps(self) -> MapLedger:
        """This process's ledger of map steps' items (on the same engine and lease)."""
        if self._maps is None:
            ledger = self.ledger
            self._maps = MapLedger(
                engine=self.engine,
                lease_seconds=ledger.lease_seconds,
                unavailable_for=ledger.unavailable_for,
            )
        return self._maps

    @property
    def timers(self) -> TimerLedger:
        """This process's ledger of timers (on the same engine)."""
        if self._timers is None:
            self._timers = TimerLedger(engine=self.engine)
        return self._timers

    @property
    def limits(self) -> LimitLedger:
        """This process's ledger of limit waits (on the same engine)."""
        if self._limits is None:
            self._limits = LimitLedger(
                engine=self.engine, unavailable_for=self.ledger.unavailable_for
            )
        return self._limits

    @property
    def signals(self) -> SignalLedger:
        """This process's ledger of signals (on the same engine)."""
        if self._signals is None:
            self._signals = SignalLedger(
                engine=self.engine,
                unavailable_for=self.ledger.unavailable_for,
                keep_for=self.ledger.signal_keep_for,
            )
        return self._signals

    def resources_for(self, pipeline: Pipeline[object]) -> object:
        """The pipeline's resources in this process, built on first use."""
        if pipeline.name not in self._resources:
            self._resources[pipeline.name] = pipeline.resources(self.settings)
        return self._resources[pipeline.name]

    def close(self) -> None:
        """Release the connections (resources with a `close` method are closed too)."""
        if self._leases is not None:
            self._leases.close()
        for resource in self._resources.values():
            close = getattr(resource, "close", None)
            if callable(close):
                close()
        self._resources.clear()
        self.ledger.close()
        self.engine.dispose()


def step_time_limit(settings: Settings, pipeline: Pipeline[object], step: str) -> float:
    """Seconds one attempt of a pipeline's step may take: the settings' per-step override,
    else the step's own limit, else `ONCELERY_STEP_TIME_LIMIT`."""
    configured = settings.step_policies.get(f"{pipeline.name}.{step}")
    if configured is not None and configured.time_limit is not None:
        return configured.time_limit
    return pipeline.step(step).time_limit or settings.step_time_limit


def load_pipelines(settings: Settings) -> None:
    """Import the modules that declare pipelines: the shipped ones, then those named in
    `ONCELERY_PIPELINES` (the engine knows pipelines only through the registry)."""
    for module in (*SHIPPED_PIPELINES, *settings.pipelines):
        importlib.import_module(module)
    check_configured_limits(settings)


def check_configured_limits(settings: Settings) -> None:
    """Refuse `ONCELERY_LIMITS` naming a step no loaded pipeline has, or a key the step
    cannot render (a field its pipeline's input lacks, an item field on a step that is not
    a map step).

    Raises:
        ConfigError: naming the variable and what is wrong.
    """
    for name, configured in settings.limits.items():
        pipeline_name, _, step_name = name.rpartition(".")
        try:
            pipeline = registry.get(pipeline_name)
            step = pipeline.step(step_name)
        except (UnknownPipeline, KeyError):
            raise ConfigError(
                "ONCELERY_LIMITS", f"{name}: no such step (expected <pipeline>.<step>)"
            ) from None
        if step.sleeps:
            raise ConfigError("ONCELERY_LIMITS", f"{name}: a wait step takes no limits")
        try:
            limits = effective_limits(step.limits, configured)
            check_limits(step.name, limits, items=hasattr(step, "each"))
        except ValueError as exc:
            raise ConfigError("ONCELERY_LIMITS", f"{name}: {exc}") from None
        model = pipeline.input
        missing = missing_fields(limits, model.model_fields) if model is not None else []
        if missing:
            raise ConfigError(
                "ONCELERY_LIMITS",
                f"{name}: a key names fields {missing} that the pipeline's input lacks",
            )


def declared_pipelines() -> list[Pipeline[object]]:
    """Every pipeline declared in this process."""
    return list(registry)
