"""`Runtime`: what one process needs to run steps: its engine, ledger, store and the pipelines'
resources, built after the fork so no connection is ever shared between processes."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from config import SHIPPED_PIPELINES, Settings
from jobs.engine.crashpoints import Crasher
from jobs.engine.leases import LeaseKeeper
from jobs.pipelines import Pipeline, Step, registry
from jobs.retry import RetryPolicy, effective_policy
from ledger import JobStore, MapLedger, SignalLedger, StepLedger, TimerLedger, create_engine


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


def declared_pipelines() -> list[Pipeline[object]]:
    """Every pipeline declared in this process."""
    return list(registry)
