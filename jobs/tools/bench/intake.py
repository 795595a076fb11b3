"""`oncelery bench --intake`: what the webhook of a real `oncelery api` costs under load, signed
order-placed events posted at a fixed concurrency, each answer timed, in the bench database."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from config import MAIN_QUEUE
from jobs.ops.signatures import sign
from jobs.tools import databases, processes
from jobs.tools.bench import BenchFailed, figures, sql
from jobs.tools.bench.rows import Broker, clear_queues, inherited_environment
from jobs.tools.harness import generate_orders
from ledger import create_engine

#: Seconds one answer may take before the client gives up on the run.
ANSWER_TIMEOUT: Final = 60.0
#: Seconds the relay may take to send the last accepted job before the bench says so.
DRAIN_TIMEOUT: Final = 120.0
#: The issue's target for the webhook at 50 concurrent clients: p99 in milliseconds.
TARGET_P99_MS: Final = 50.0


@dataclass(frozen=True)
class IntakeOptions:
    """What one intake bench measures."""

    brokers: tuple[Broker, ...]
    events: int = 3000
    concurrency: int = 50
    runs: int = 1
    warmup: int = 300


@dataclass(frozen=True)
class IntakeRun:
    """The figures of one run: `events` posted at `concurrency`, answered in `seconds`; from them
    answers/s, latency percentiles, the API's CPU per event, and how long the outbox relay took
    to hand the last job to the broker."""

    broker: str
    round: int
    events: int
    concurrency: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int]
    api_cpu_ms_per_event: float
    drained_after_s: float | None

    @property
    def answers_per_s(self) -> float:
        """Answers per second over the run."""
        return self.events / self.seconds

    @property
    def meets_target(self) -> bool:
        """Whether p99 is within the issue's target."""
        return self.p99_ms <= TARGET_P99_MS

    def as_json(self) -> dict[str, object]:
        """For `--json`."""
        return {
            "broker": self.broker,
            "round": self.round,
            "events": self.events,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "answers_per_s": round(self.answers_per_s, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p90_ms": round(self.p90_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "max_ms": round(self.max_ms, 2),
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "api_cpu_ms_per_event": round(self.api_cpu_ms_per_event, 3),
            "relay_drained_after_s": (
                None if self.drained_after_s is None else round(self.drained_after_s, 2)
            ),
            "target_p99_ms": TARGET_P99_MS,
            "meets_target": self.meets_target,
        }

    def line(self) -> str:
        """One line for people."""
        drained = "?" if self.drained_after_s is None else f"{self.drained_after_s:.2f}s"
        return (
            f"{self.broker} round {self.round}: {self.events} events at concurrency "
            f"{self.concurrency}: {self.answers_per_s:.0f} answers/s, p50 {self.p50_ms:.1f} ms, "
            f"p90 {self.p90_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms, "
            f"API CPU {self.api_cpu_ms_per_event:.2f} ms/event, outbox drained {drained} after "
            f"the last answer, statuses {dict(sorted(self.statuses.items()))} "
            f"(target p99 <= {TARGET_P99_MS:.0f} ms: {'met' if self.meets_target else 'NOT met'})"
        )


def run_intake_bench(
    database_url: str, data_dir: Path, options: IntakeOptions, log: Callable[[str], None]
) -> list[IntakeRun]:
    """Post the events to a fresh `oncelery api` per run, on each broker, from a client on the
    same machine; every process the bench starts is stopped before it returns.

    Raises:
        BenchFailed: the bench database could not be prepared, the API did not start, or an
            answer was not a 202.
    """
    bench_url = databases.bench_database_url(database_url)
    engine = databases.prepare_bench_database(bench_url)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    work_dir = (data_dir / "bench" / f"intake-{run_id}").resolve()
    log(f"bench database {databases.database_name(bench_url)}; logs in {work_dir / 'logs'}")
    runs = []
    try:
        for number in range(1, options.runs + 1):
            for broker in options.brokers:
                databases.empty_ledger(engine)
                clear_queues(broker.url, [MAIN_QUEUE])
                bench = _IntakeRow(bench_url, broker, work_dir, f"{run_id}-{number}")
                run = bench.run(options, number)
                log(run.line())
                runs.append(run)
                clear_queues(broker.url, [MAIN_QUEUE])
    finally:
        databases.empty_ledger(engine)
        engine.dispose()
    return runs


@dataclass(frozen=True)
class _IntakeRow:
    bench_url: str
    broker: Broker
    work_dir: Path
    name: str

    def run(self, options: IntakeOptions, number: int) -> IntakeRun:
        secret = secrets.token_urlsafe(32)
        port = processes.free_port()
        env = {
            **inherited_environment(),
            "DATABASE_URL": self.bench_url,
            "BROKER_URL": self.broker.url,
            "ONCELERY_DATA_DIR": str(self.work_dir / "data"),
            "WEBHOOK_SECRET": secret,
            "API_TOKEN": secrets.token_urlsafe(32),
        }
        argv = [sys.executable, "-m", "jobs", "api", "--port", str(port)]
        api = processes.start(
            f"api-{self.broker.kind}-{number}", argv, env=env, log_dir=self.work_dir / "logs"
        )
        try:
            processes.wait_until_answers(f"http://127.0.0.1:{port}/healthz", process=api)
            prefix = f"intake-{self.name}-{self.broker.kind}-"
            warm = signed_requests(secret, f"{prefix}warm-", options.warmup)
            _check(asyncio.run(post_all(port, warm, options.concurrency)), api)
            measured = signed_requests(secret, f"{prefix}main-", options.events)
            cpu_before = figures.group_cpu_seconds(api.pid)
            began = time.perf_counter()
            answers = asyncio.run(post_all(port, measured, options.concurrency))
            seconds = time.perf_counter() - began
            cpu = figures.group_cpu_seconds(api.pid) - cpu_before
            _check(answers, api)
            drained = _drained_after(self.bench_url, time.perf_counter())
        finally:
            api.stop()
        latencies = [elapsed * 1000 for _, elapsed in answers]
        return IntakeRun(
            broker=self.broker.kind,
            round=number,
            events=options.events,
            concurrency=options.concurrency,
            seconds=seconds,
            p50_ms=figures.percentile(latencies, 0.5) or 0.0,
            p90_ms=figures.percentile(latencies, 0.9) or 0.0,
            p99_ms=figures.percentile(latencies, 0.99) or 0.0,
            max_ms=max(latencies),
            statuses=dict(Counter(status for status, _ in answers)),
            api_cpu_ms_per_event=cpu * 1000 / options.events,
            drained_after_s=drained,
        )


def signed_requests(secret: str, prefix: str, count: int) -> list[bytes]:
    """`count` whole HTTP/1.1 requests of the webhook, each a new order, signed now (built
    before the clock starts, so the client spends its time sending)."""
    stamp = str(int(time.time()))
    requests = []
    for order in generate_orders(count, prefix, declined_rate=0.0, seed=count):
        body = order.model_dump_json().encode()
        head = (
            "POST /webhooks/order-placed HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Oncelery-Timestamp: {stamp}\r\n"
            f"X-Oncelery-Signature: {sign(secret, stamp, body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    return requests


async def post_all(
    port: int, requests: Sequence[bytes], concurrency: int
) -> list[tuple[int, float]]:
    """Send every request over `concurrency` kept-alive connections, each sending its next
    request when the last is answered; each answer's status and seconds, in no order.

    A bare HTTP/1.1 client on asyncio streams: a full client library would spend more CPU
    per request than the server, on the same cores, and be measured with it.
    """
    pending = iter(requests)
    answers: list[tuple[int, float]] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in pending:
                began = time.perf_counter()
                writer.write(request)
                status = await asyncio.wait_for(_read_answer(reader), ANSWER_TIMEOUT)
                answers.append((status, time.perf_counter() - began))
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one answer (head and body); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


def _check(answers: list[tuple[int, float]], api: processes.ManagedProcess) -> None:
    refused = Counter(status for status, _ in answers if status != 202)
    if refused:
        raise BenchFailed(f"the API answered {dict(refused)} instead of 202; see {api.log_path}")


def _drained_after(bench_url: str, since: float) -> float | None:
    """Seconds from `since` until the relay has sent every accepted job (None: not within
    `DRAIN_TIMEOUT`)."""
    engine = create_engine(bench_url, pool_size=1)
    try:
        deadline = since + DRAIN_TIMEOUT
        while time.perf_counter() < deadline:
            with databases.bench_errors("counting the outbox"), engine.connect() as conn:
                waiting = int(conn.execute(sql.count_undispatched()).scalar_one())
            if not waiting:
                return time.perf_counter() - since
            time.sleep(0.02)
        return None
    finally:
        engine.dispose()
