"""The places crawl under fire, opt-in (`TEST_CRAWL_CHAOS=1`, a minute or two; figures in
the closing notes, not in CI): the demo's four crawls with 10 % 5xx, 5 % timeouts and 3 %
lost replies, workers dying at crash points and SIGKILLed each time another tenth of the
items is done, and the broker (a RabbitMQ of its own) restarted a fifth of the way — the
same exact figures as a quiet run."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from jobs.tools import processes
from jobs.tools.crawl_demo import AREAS
from tests.services import OwnRabbitMQ, running
from tests.system.conftest import SystemFactory
from tests.system.test_places_crawl import (
    CRASHES,
    RECOVERY_SETTINGS,
    assert_audit_clean,
    assert_crawled_once,
    enqueue_crawl,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.chaos,
    pytest.mark.skipif(not os.environ.get("TEST_CRAWL_CHAOS"), reason="opt-in: TEST_CRAWL_CHAOS=1"),
]

#: Searches each of the demo's areas takes (seed 1), in `AREAS` order.
QUERIES = (105, 319, 130, 536)


def test_crawls_under_kills_faults_and_a_broker_restart_pay_once_and_lose_nothing(
    tmp_path: Path,
    postgres_url: str,
    system_factory: SystemFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = OwnRabbitMQ(tmp_path / "rabbitmq", processes.free_port())
    with running(broker) as broker_url:
        system = system_factory(
            database_url=postgres_url,
            broker_url=broker_url,
            sandbox_options=[
                "--fault-rate", "0.1", "--timeout-rate", "0.05", "--lost-reply-rate", "0.03",
            ],
            extra_env={**RECOVERY_SETTINGS, **CRASHES},
        )  # fmt: skip
        system.start_beat()
        workers = [p for p in system.started if p.name.startswith("worker")]
        names = [f"chaos{n}" for n in range(len(AREAS))]
        jobs = [enqueue_crawl(system, name, area) for name, area in zip(names, AREAS, strict=True)]
        total = sum(QUERIES)

        def done() -> int:
            histories = [system.store.history(uuid.UUID(job)) for job in jobs]
            return sum(counters.done for history in histories for counters in history.maps)

        kills = restarts = 0
        for tenth in range(1, 10):
            wanted = tenth * total // 10
            system.wait_for(lambda: done() >= wanted, f"{wanted} items done", timeout=240)  # noqa: B023
            victim = workers.pop(0)
            victim.signal(signal.SIGKILL)
            victim.stop()
            system.started.remove(victim)
            workers.append(system.start_worker(f"worker-after-kill-{tenth}"))
            kills += 1
            if tenth == 2:
                subprocess.run(broker.restart_command, shell=True, check=True, timeout=120)
                restarts += 1
        for name in names:
            system.wait_finished(name, 1, timeout=300)

        assert (kills, restarts) == (9, 1)
        for name, job, area, queries in zip(names, jobs, AREAS, QUERIES, strict=True):
            assert assert_crawled_once(system, job, name, area) == queries
        crawls = assert_audit_clean(system)
        assert crawls["queries"] == total
        with capsys.disabled():
            print(
                f"\ncrawl chaos: {len(jobs)} crawls, {total} queries billed once each, "
                f"{crawls['places_found']} places of {crawls['places_expected']}, "
                f"{len(list((system.data_dir / 'crash-markers').iterdir()))} crash points, "
                f"{kills} kills, {restarts} broker restart, "
                f"{sum(1 for r in system.requests() if r['service'] == 'places')} searches sent"
            )
