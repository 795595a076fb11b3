"""The real `oncelery api` process (uvicorn) at its edges: empty secrets leave the endpoints
closed, a short one stops it at start, absurd headers get a 4xx, and `/healthz` says which
dependency is down without its error text."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from config import child_environment
from jobs.ops.signatures import sign
from jobs.tools import processes
from tests.conftest import REPO_ROOT
from tests.factories import order_event
from tests.waiting import wait_for

pytestmark = pytest.mark.system

SECRET, TOKEN = "whsec-guards-0123456789", "token-guards-0123456789"

StartApi = Callable[..., str]


@pytest.fixture
def start_api(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[StartApi]:
    """Starts `oncelery api` processes on the test's database; returns each one's base URL."""
    started: list[processes.ManagedProcess] = []

    def start(*, healthy: bool = True, **env: str) -> str:
        port = processes.free_port()
        overrides = {
            "DATABASE_URL": postgres_url,
            "BROKER_URL": redis_url,
            "ONCELERY_DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(REPO_ROOT),
            **env,
        }
        api = processes.start(
            f"api{len(started)}",
            [sys.executable, "-m", "jobs", "api", "--port", str(port)],
            env=child_environment(overrides),
            log_dir=tmp_path / "logs",
        )
        started.append(api)
        base = f"http://127.0.0.1:{port}"
        if healthy:
            processes.wait_until_answers(f"{base}/healthz", process=api, timeout=60)
            return base

        # Unhealthy: any answer will do, a 503 included.
        def answering() -> bool:
            if answers(f"{base}/healthz"):
                return True
            assert api.alive(), f"{api.name} died; see {api.log_path}"
            return False

        wait_for(answering, "the API to answer", timeout=60)
        return base

    yield start
    processes.stop_all(started)


def order_event_body() -> bytes:
    return json.dumps(order_event()).encode()


def signed(secret: str, body: bytes, stamp: str | None = None) -> dict[str, str]:
    stamp = stamp or str(int(time.time()))
    return {"X-Oncelery-Timestamp": stamp, "X-Oncelery-Signature": sign(secret, stamp, body)}


def test_empty_secrets_leave_every_endpoint_closed(start_api: StartApi) -> None:
    # Given the API started as docker-compose ships it: both secrets set to ""
    base = start_api(API_TOKEN="", WEBHOOK_SECRET="")
    # "Bearer " arrives as "Bearer": HTTP strips the trailing space; the token is empty.
    empty_bearer = {"Authorization": "Bearer"}

    # When someone sends an empty bearer token, or a webhook signed with the empty key
    answers = {
        "jobs": httpx.get(f"{base}/jobs", headers=empty_bearer, timeout=30),
        "metrics": httpx.get(f"{base}/metrics", headers=empty_bearer, timeout=30),
        "dead letters": httpx.get(f"{base}/dead-letters", headers=empty_bearer, timeout=30),
        "replay": httpx.post(f"{base}/dead-letters/1/replay", headers=empty_bearer, timeout=30),
    }
    body = order_event_body()
    answers["webhook"] = httpx.post(
        f"{base}/webhooks/order-placed", content=body, headers=signed("", body), timeout=30
    )

    # Then every one is refused with a JSON error saying the server is not configured
    for name, answer in answers.items():
        assert answer.status_code == 503, (name, answer.status_code, answer.text)
        assert answer.json()["error"]["type"] == "not_configured", name
    assert "API_TOKEN" in answers["jobs"].json()["error"]["message"]
    assert "WEBHOOK_SECRET" in answers["webhook"].json()["error"]["message"]


@pytest.mark.parametrize("variable", ["API_TOKEN", "WEBHOOK_SECRET"])
def test_a_short_secret_stops_the_api_at_start(
    variable: str, postgres_url: str, tmp_path: Path
) -> None:
    env = child_environment(
        {
            "DATABASE_URL": postgres_url,
            "ONCELERY_DATA_DIR": str(tmp_path),
            "PYTHONPATH": str(REPO_ROOT),
            "API_TOKEN": TOKEN,
            "WEBHOOK_SECRET": SECRET,
            variable: "short-secret",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "api", "--port", str(processes.free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert variable in done.stderr
    assert "16 characters" in done.stderr
    assert "short-secret" not in done.stderr


def test_absurd_numbers_in_headers_get_a_4xx_from_the_real_server(start_api: StartApi) -> None:
    base = start_api(API_TOKEN=TOKEN, WEBHOOK_SECRET=SECRET)
    body = order_event_body()

    stamp = "9" * 5000
    answer = httpx.post(
        f"{base}/webhooks/order-placed",
        content=body,
        headers=signed(SECRET, body, stamp),
        timeout=30,
    )
    assert answer.status_code == 401
    assert "X-Oncelery-Timestamp" in answer.json()["error"]["message"]

    head = (
        "POST /webhooks/order-placed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {'9' * 5000}\r\n\r\n"
    )
    status_line = raw_request(base, head.encode() + body).split(b"\r\n", 1)[0]
    assert status_line.split()[1].startswith(b"4"), status_line
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


def raw_request(base: str, request: bytes) -> bytes:
    """Send bytes no client library would, and read what comes back until the server closes
    or a second passes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        conn.settimeout(1.0)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := conn.recv(65536):
                received += chunk
    return received


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return False
    return True


def test_healthz_names_the_dependency_down_without_its_error_text(start_api: StartApi) -> None:
    # Given a broker URL where nothing listens, on a port only this test knows
    port = processes.free_port()
    base = start_api(
        healthy=False,
        API_TOKEN=TOKEN,
        WEBHOOK_SECRET=SECRET,
        BROKER_URL=f"amqp://guest:guest@127.0.0.1:{port}//",
    )

    answer = httpx.get(f"{base}/healthz", timeout=30)

    assert answer.status_code == 503
    assert answer.json() == {"database": "ok", "broker": "unavailable"}


class HangingProxy:
    """A TCP proxy to Postgres that the test can make hang: after `hang()` it passes no byte
    either way and answers no new connection, its sockets left open, as a server stopped
    with SIGSTOP or lost behind a stuck network would (never the shared Postgres itself)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hanging = threading.Event()
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.hanging.set()

    def release(self) -> None:
        self.hanging.clear()
        self.released.set()

    def close(self) -> None:
        self.release()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.hanging.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.hanging.is_set():
                    self.released.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def hanging_postgres(postgres_url: str) -> Iterator[tuple[HangingProxy, str]]:
    """A proxy to the test's database, and the database's URL through it."""
    url = sa.make_url(postgres_url)
    proxy = HangingProxy((url.host or "127.0.0.1", url.port or 5432))
    yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.close()


def test_healthz_and_the_webhook_answer_while_postgres_hangs(
    start_api: StartApi, hanging_postgres: tuple[HangingProxy, str]
) -> None:
    # Given the API on a Postgres reached through a proxy that can hang, short timeouts
    proxy, through_proxy = hanging_postgres
    base = start_api(
        API_TOKEN=TOKEN,
        WEBHOOK_SECRET=SECRET,
        DATABASE_URL=through_proxy,
        ONCELERY_INTAKE_CONNECT_TIMEOUT="2",
        ONCELERY_INTAKE_STATEMENT_TIMEOUT="2",
    )

    def post() -> httpx.Response:
        body = order_event_body()
        return httpx.post(
            f"{base}/webhooks/order-placed", content=body, headers=signed(SECRET, body), timeout=60
        )

    assert post().status_code == 202

    # When Postgres hangs with webhooks waiting on it
    proxy.hang()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(post) for _ in range(4)]

        # Then /healthz still answers, naming the database
        health = httpx.get(f"{base}/healthz", timeout=15)
        assert health.status_code == 503
        assert health.json() == {"database": "unavailable", "broker": "ok"}

        # And each webhook gets a 503 saying to send it again, not an endless wait
        for answer in (future.result(timeout=60) for future in waiting):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["type"] == "database_unavailable"

    # When Postgres is back, so is the API
    proxy.release()
    wait_for(
        lambda: httpx.get(f"{base}/healthz", timeout=15).status_code == 200, "health", timeout=60
    )
    assert post().status_code == 202
