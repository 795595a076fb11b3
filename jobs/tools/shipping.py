"""The warehouse of the order-fulfilment demo and chaos run: it says `shipped` for half the
orders — some before their job reaches its wait, the rest once it waits, some twice with
the same signal id — through one or more ways in (the Python API, the signed HTTP route,
the CLI), and counts what each send answered."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from jobs.engine.dispatch import Dispatch
from jobs.engine.runtime import Runtime
from jobs.engine.signals import send_signal
from jobs.ops.signatures import sign
from jobs.orders import SHIPPED
from jobs.orders.steps.shipping import WAIT_STEP
from ledger import JSON, JobStore, LedgerError, NewSignal

logger = logging.getLogger(__name__)

#: Sends one `shipped` signal (order id, signal id, data); answers `recorded` or `duplicate`.
Send = Callable[[str, str, JSON], str]


@dataclass(frozen=True)
class ShippingPlan:
    """Which orders of a run are signalled, and when: `early` right after they are enqueued
    (before any reaches its wait: the signal is kept for it), `late` once their job waits,
    `twice` of either sent again with the same signal id (a duplicate, which changes nothing).
    The other half never ships: its orders get a reminder when their wait times out."""

    early: tuple[str, ...]
    late: tuple[str, ...]
    twice: frozenset[str]

    @classmethod
    def for_orders(cls, order_ids: Sequence[str]) -> ShippingPlan:
        """Every other order shipped; of those, one in four early and one in three twice."""
        shipped = list(order_ids[::2])
        early = tuple(order for n, order in enumerate(shipped) if n % 4 == 0)
        late = tuple(order for n, order in enumerate(shipped) if n % 4 != 0)
        return cls(early, late, frozenset(shipped[1::3]))


@dataclass
class Warehouse:
    """Sends a run's `shipped` signals as its plan says, round-robin over `senders`, up to
    `parallel` at once (a send that fails, a server restarting, is sent again, same id)."""

    plan: ShippingPlan
    senders: Sequence[tuple[str, Send]]
    parallel: int = 1
    answers: Counter[str] = field(default_factory=Counter)
    #: Sends by way in (`python`, `webhook`, `cli`).
    ways: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting_for: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._waiting_for = list(self.plan.late)

    def ship_early(self) -> None:
        """Send the early signals (their jobs have not reached their wait yet)."""
        self._ship_all(self.plan.early)

    def ship_waiting(self, store: JobStore, prefix: str) -> int:
        """Send the late signals of the orders whose job now waits (or went past its wait,
        by its timeout: the signal is then kept, unused); how many are still to send."""
        if not self._waiting_for:
            return 0
        try:
            jobs = store.jobs_with_event_prefix(prefix)
        except LedgerError:
            return len(self._waiting_for)  # the database restarts: next time
        reached = {
            str(job.context.get("order_id"))
            for job in jobs
            if job.current_step == WAIT_STEP or WAIT_STEP in job.results
        }
        ready = [order for order in self._waiting_for if order in reached]
        self._waiting_for = [order for order in self._waiting_for if order not in reached]
        self._ship_all(ready)
        return len(self._waiting_for)

    def ship_until_done(self, store: JobStore, prefix: str, stop: threading.Event) -> None:
        """`ship_waiting` every half second until every late signal is sent (or `stop`)."""
        while self.ship_waiting(store, prefix) and not stop.wait(0.5):
            pass

    def _ship_all(self, order_ids: Sequence[str]) -> None:
        sends = [order for order in order_ids for _ in range(1 + (order in self.plan.twice))]
        if self.parallel <= 1:
            for order_id in sends:
                self._ship(order_id)
            return
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="warehouse") as pool:
            list(pool.map(self._ship, sends))

    def _ship(self, order_id: str) -> None:
        with self._lock:
            way, send = self.senders[next(self._turn) % len(self.senders)]
        data: JSON = {"carrier": "DHL", "tracking": f"trk-{order_id}"}
        for attempt in range(1, 61):
            try:
                answer = send(order_id, f"ship-{order_id}", data)
            except Exception as exc:  # noqa: BLE001 - a restart: sent again, same id
                if attempt == 60:
                    with self._lock:
                        self.failures.append(f"{order_id} via {way}: {exc}")
                time.sleep(1.0)
                continue
            with self._lock:
                self.answers[answer] += 1
                self.ways[way] += 1
            return


def python_sender(rt: Runtime, dispatch: Dispatch) -> Send:
    """Signals through the engine, as `jobs.signal` does."""

    def send(order_id: str, signal_id: str, data: JSON) -> str:
        return str(send_signal(rt, dispatch, NewSignal(SHIPPED, order_id, signal_id, data)).outcome)

    return send


def webhook_sender(base_url: str, secret: str) -> Send:
    """Signals through `POST /signals/shipped`, signed with `secret`."""

    def send(order_id: str, signal_id: str, data: JSON) -> str:
        body = json.dumps({"key": order_id, "signal_id": signal_id, "data": data}).encode()
        stamp = str(int(time.time()))
        headers = {
            "X-Oncelery-Timestamp": stamp,
            "X-Oncelery-Signature": sign(secret, stamp, body),
            "Content-Type": "application/json",
        }
        answer = httpx.post(
            f"{base_url}/signals/{SHIPPED}", content=body, headers=headers, timeout=30
        )
        if answer.status_code not in (200, 202):
            raise RuntimeError(
                f"POST /signals/{SHIPPED} answered {answer.status_code}: {answer.text}"
            )
        return str(answer.json()["outcome"])

    return send


def cli_sender(env: dict[str, str]) -> Send:
    """Signals through `oncelery signal` (a process each)."""

    def send(order_id: str, signal_id: str, data: JSON) -> str:
        argv = [sys.executable, "-m", "jobs", "signal", SHIPPED, "--key", order_id]
        argv += ["--id", signal_id, "--data", json.dumps(data)]
        # The argument list is ours; the values are a run's own order ids.
        done = subprocess.run(  # noqa: S603
            argv, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"oncelery signal exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    return send
