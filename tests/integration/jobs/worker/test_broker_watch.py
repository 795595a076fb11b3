"""How the sweeper learns that Redis lost its queues (`jobs.worker.queues.RedisWatch`), on a private
redis-server this test starts, restarts without persistence and stops by PID."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from jobs.engine.sweeper import BlindWatch
from jobs.tools import processes
from jobs.worker.queues import SEEN_KEY, RedisWatch, broker_watch
from tests.waiting import wait_for


class PrivateRedis:
    """A redis-server without persistence on a free port."""

    def __init__(self, folder: Path) -> None:
        self.port = processes.free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=self.port, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not installed")
        argv = [server, "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*argv, "--dir", str(self.folder)], stdout=subprocess.DEVNULL
        )

        def answers() -> bool:
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, f"redis-server to answer on port {self.port}", timeout=15, interval=0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=15)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_restart_without_persistence_is_a_loss_of_everything_sent_before_it(
    private_redis: PrivateRedis,
) -> None:
    watch = RedisWatch(Celery(broker=private_redis.url))
    # Given a Redis the sweeper has seen
    assert watch.lost() is not None  # a first look: no note yet
    watch.seen()
    assert watch.lost() is None

    # When it restarts without persistence
    private_redis.stop()
    private_redis.start()
    loss = watch.lost()

    # Then every message sent before it started is lost
    assert loss is not None
    assert loss.after is None
    assert 0 <= loss.before <= 5
    watch.seen()
    assert watch.lost() is None


def test_a_restart_that_kept_its_data_lost_what_came_after_its_save(
    private_redis: PrivateRedis,
) -> None:
    # Given a note of another server (this one loaded an older save of it) written 40 s ago
    seconds, micros = private_redis.client.time()
    private_redis.client.set(SEEN_KEY, f"{'0' * 40} {seconds + micros / 1e6 - 40}")

    loss = RedisWatch(Celery(broker=private_redis.url)).lost()

    # Then what was sent between the note and the restart may be lost
    assert loss is not None
    assert loss.after is not None
    assert loss.before <= 5
    assert 39 <= loss.after <= 45


def test_a_note_of_another_server_written_while_this_one_ran_is_a_failover(
    private_redis: PrivateRedis,
) -> None:
    # Given a note another server wrote after this one started (it replicated it)
    wait_for(
        lambda: int(private_redis.client.info("server")["uptime_in_seconds"]) >= 1,
        "redis-server to have run a second",
        timeout=15,
    )
    seconds, micros = private_redis.client.time()
    private_redis.client.set(SEEN_KEY, f"{'0' * 40} {seconds + micros / 1e6}")

    loss = RedisWatch(Celery(broker=private_redis.url)).lost()

    # Then whatever was sent since the note may be missing
    assert loss is not None
    assert loss.before == 0.0
    assert loss.after is not None
    assert loss.after < 1


def test_only_redis_is_watched() -> None:
    assert isinstance(broker_watch(Celery(broker="amqp://guest@127.0.0.1//")), BlindWatch)
