"""The real `oncelery api` process: signed orders are accepted (202) even while the broker is
down, and are done exactly once when it comes back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jobs.ops.signatures import sign
from jobs.tools import processes
from ledger import JobState
from tests.factories import order_event
from tests.services import OwnRabbitMQ, running
from tests.system.conftest import System, SystemFactory, per_order

pytestmark = pytest.mark.system

SECRET, TOKEN = "whsec-system-test", "token-system-test"


def relay_refused(log: str) -> int:
    """How many jobs the API's outbox relay failed to send, by its log."""
    return sum(int(count) for count in re.findall(r"send of (\d+) jobs failed", log))


def test_orders_accepted_while_the_broker_is_down_are_done_when_it_is_back(
    postgres_url: str, tmp_path: Path, system_factory: SystemFactory
) -> None:
    # Given the API and workers on a RabbitMQ node of the test's own (it is stopped below)
    broker = OwnRabbitMQ(tmp_path / "rabbitmq", processes.free_port())
    with running(broker) as amqp_url:
        system = system_factory(database_url=postgres_url, broker_url=amqp_url)
        try:
            _accepted_while_down(broker, system)
        finally:
            processes.stop_all(system.started)  # before their broker goes


def _accepted_while_down(broker: OwnRabbitMQ, system: System) -> None:
    port = processes.free_port()
    api = processes.start(
        "api",
        [sys.executable, "-m", "jobs", "api", "--port", str(port)],
        env={**system.env, "WEBHOOK_SECRET": SECRET, "API_TOKEN": TOKEN},
        log_dir=system.log_dir,
    )
    system.started.append(api)
    base = f"http://127.0.0.1:{port}"
    processes.wait_until_answers(f"{base}/healthz", process=api, timeout=60)
    prefix = f"outage-{system.data_dir.name}-{int(time.time())}-"

    # The same event each time it is posted: an event id with other content is a conflict.
    events = {n: order_event(event_id=f"{prefix}{n}", order_id=f"{prefix}{n}") for n in range(5)}

    def post(number: int) -> httpx.Response:
        body = json.dumps(events[number]).encode()
        stamp = str(int(time.time()))
        headers = {"X-Oncelery-Timestamp": stamp, "X-Oncelery-Signature": sign(SECRET, stamp, body)}
        return httpx.post(
            f"{base}/webhooks/order-placed", content=body, headers=headers, timeout=30
        )

    # When the broker is down, orders are still accepted
    subprocess.run(broker.ctl("stop_app"), check=True, timeout=120, capture_output=True)
    try:
        answers = [post(n) for n in range(5)]
        assert [a.status_code for a in answers] == [202] * 5
        assert httpx.get(f"{base}/healthz", timeout=30).json()["broker"] != "ok"
        # (the relay tries to send each one at once, fails, and leaves it in the outbox)
        system.wait_for(
            lambda: relay_refused(api.log_path.read_text()) >= 5,
            "the relay's failed sends of the five jobs",
        )
        assert system.store.count_by_state(event_prefix=prefix)[JobState.PENDING] == 5
    finally:
        subprocess.run(broker.ctl("start_app"), check=True, timeout=120, capture_output=True)

    # Then, once it is back, every order is done, once
    assert system.wait_finished(prefix, 5, timeout=120)[JobState.SUCCEEDED] == 5
    assert per_order(system.effects(), "charge") == {f"{prefix}{n}": 1 for n in range(5)}
    assert post(0).status_code == 200
    job = httpx.get(
        f"{base}/jobs/{answers[0].json()['job_id']}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert job.json()["state"] == "succeeded"
