"""How the bench feeds each kind of row and sees its orders finish: bare Celery chains counted
by file sizes, or oncelery jobs enqueued like `oncelery enqueue` and counted in the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import psycopg
from celery import Celery
from sqlalchemy.engine import Engine

from jobs.engine.enqueue import start_jobs
from jobs.pipelines import Pipeline
from jobs.tools import databases
from jobs.tools.bench import BenchFailed, bare, sql
from jobs.tools.harness import generate_orders
from jobs.worker import CeleryDispatch
from ledger import JSON, JobState, JobStore

#: Seconds between two looks while one latency probe is in flight: well under the figures
#: measured, so that the look's own timing, the same for every row, blurs them least.
PROBE_INTERVAL: Final = 0.0002
#: Seconds one latency probe may take before the bench gives up.
PROBE_TIMEOUT: Final = 30.0


@dataclass(frozen=True)
class Batch:
    """Orders ready to send, tagged with a name unique within the row."""

    name: str
    count: int
    #: Ledger rows: each order's (event id, job context).
    events: Sequence[tuple[str, Mapping[str, JSON]]] = ()


class Driver(Protocol):
    """Sends a row's orders and counts those finished."""

    #: Statements the bench itself ran in the bench database (to leave out of the counts).
    polls: int

    def prepare(self, name: str, count: int) -> Batch:
        """Orders to send later (building them is not part of the enqueue rate)."""

    def send(self, batch: Batch) -> None:
        """Enqueue the batch, as fast as one producer can."""

    def finished(self, batch: Batch) -> int:
        """How many of the batch's orders are done (raises `BenchFailed` if any failed)."""

    def probe(self, name: str) -> float:
        """Seconds from enqueueing one order to seeing it done."""


class BareDriver:
    """Bare Celery chains; a batch's chains count themselves in a folder of their own.

    Args:
        sender: the app that publishes.
        folder: the row's folder, shared with the workers.
    """

    def __init__(self, sender: Celery, folder: Path) -> None:
        self.sender = sender
        self.folder = folder
        self.polls = 0

    def prepare(self, name: str, count: int) -> Batch:
        (self.folder / name).mkdir(parents=True, exist_ok=True)
        return Batch(name, count)

    def send(self, batch: Batch) -> None:
        target = self.folder / batch.name
        for _ in range(batch.count):
            bare.send_chain(self.sender, target)

    def finished(self, batch: Batch) -> int:
        return bare.finished_chains(self.folder / batch.name)

    def probe(self, name: str) -> float:
        batch = self.prepare(name, 1)
        began = time.perf_counter()
        self.send(batch)
        return _await(lambda: self.finished(batch) >= 1, began, name)


class LedgerDriver:
    """oncelery jobs, started with `start_jobs` (job rows, then messages, then the outbox
    mark) and counted by state in the ledger.

    Args:
        store: the bench database's job store.
        dispatch: publishes the first step of each job.
        pipeline: the pipeline the jobs run.
        prefix: the row's event id prefix (each batch adds its name).
    """

    def __init__(
        self, store: JobStore, dispatch: CeleryDispatch, pipeline: Pipeline[object], prefix: str
    ) -> None:
        self.store = store
        self.dispatch = dispatch
        self.pipeline = pipeline
        self.prefix = prefix
        self.polls = 0
        self._listener: ProbeListener | None = None

    def prepare(self, name: str, count: int) -> Batch:
        orders = generate_orders(count, f"{self.prefix}{name}-", declined_rate=0.0, seed=count)
        events = [
            (order.event_id, order.model_dump(mode="json", exclude={"event_id"}))
            for order in orders
        ]
        return Batch(name, count, events)

    def send(self, batch: Batch) -> None:
        self._start(batch)

    def _start(self, batch: Batch) -> list[str]:
        new_jobs = [self.pipeline.new_job(event_id, context) for event_id, context in batch.events]
        started = start_jobs(self.store, self.dispatch, self.pipeline, new_jobs)
        unsent = [item.job_id for item in started if not item.sent]
        if unsent:
            raise BenchFailed(f"{len(unsent)} jobs were stored but could not be sent")
        return [item.job_id for item in started]

    def finished(self, batch: Batch) -> int:
        self.polls += 1
        counts = self.store.count_by_state(event_prefix=f"{self.prefix}{batch.name}-")
        failed = counts[JobState.DEAD_LETTERED] + counts[JobState.CANCELLED]
        if failed:
            raise BenchFailed(
                f"{failed} orders of batch {batch.name} were dead-lettered: see the worker "
                "log and `oncelery dlq list` on the bench database"
            )
        return counts[JobState.SUCCEEDED]

    def probe(self, name: str) -> float:
        if self._listener is None:
            self._listener = ProbeListener(self.store.engine)
        batch = self.prepare(f"probe-{name}", 1)
        began = time.perf_counter()
        [job_id] = self._start(batch)
        state = self._listener.wait_for(job_id, began + PROBE_TIMEOUT)
        ended = time.perf_counter()
        if state is None:
            raise BenchFailed(f"latency probe {name} not done after {PROBE_TIMEOUT:.0f}s")
        if state is not JobState.SUCCEEDED:
            raise BenchFailed(f"latency probe {name} ended {state}")
        return ended - began

    def close(self) -> None:
        """Stop listening for probes."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class ProbeListener:
    """Hears the bench database announce each latency probe's job as it ends (the trigger of
    `sql.announce_probes`), on a connection of its own.

    Args:
        engine: the bench database's engine (its URL and connect arguments).
    """

    def __init__(self, engine: Engine) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        with databases.bench_errors("listening for latency probes"):
            self._connection = psycopg.connect(*args, **kwargs, autocommit=True)
            self._connection.execute(f"LISTEN {sql.PROBE_CHANNEL}")

    def wait_for(self, job_id: str, deadline: float) -> JobState | None:
        """How the job ended, once announced; None if it was not by `deadline`."""
        with databases.bench_errors("waiting for a latency probe"):
            while (left := deadline - time.perf_counter()) > 0:
                for note in self._connection.notifies(timeout=left, stop_after=1):
                    announced, state = note.payload.split(" ")
                    if announced == job_id:
                        return JobState(state)
        return None

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


def _await(done: Callable[[], bool], began: float, name: str) -> float:
    """Poll `done` every `PROBE_INTERVAL`; the seconds from `began` to the first True."""
    deadline = began + PROBE_TIMEOUT
    while not done():
        now = time.perf_counter()
        if now > deadline:
            raise BenchFailed(f"latency probe {name} not done after {PROBE_TIMEOUT:.0f}s")
        time.sleep(PROBE_INTERVAL)
    return time.perf_counter() - began
